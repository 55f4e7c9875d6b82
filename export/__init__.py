"""edge_vila.export — ONNX export of vision + LLM, bundle writer/reader, TensorRT
compatibility check and engine builder. Toolchain side: may import torch."""
