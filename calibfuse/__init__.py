"""calibfuse: detoxify LLMs by output-layer fusion with a small calibration model."""

__version__ = "0.1.0"
