"""TensorRT and ONNX Runtime engines, the bucketed runtime and latency profiling."""
