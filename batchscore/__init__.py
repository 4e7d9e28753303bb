"""batchscore: score piles of images with an ONNX classifier into Parquet, unattended."""

__version__ = "0.1.0"
