# CPU image of the annotator web app. For CUDA, start from an NVIDIA CUDA runtime image
# and install torch from the matching PyTorch wheel index instead.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ANNOTATOR_CACHE_DIR=/cache

WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY annotator ./annotator
COPY db ./db
RUN pip install .

RUN useradd --create-home --uid 1000 annotator && mkdir -p /cache /projects \
    && chown annotator:annotator /cache /projects
USER annotator
VOLUME ["/cache", "/projects"]
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"
CMD ["annotator", "demo", "--dir", "/projects/demo", "--host", "0.0.0.0"]
