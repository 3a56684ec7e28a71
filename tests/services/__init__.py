"""Tests of the services layer, on real projects built from the demo."""
