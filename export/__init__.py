"""ONNX export with explicit QuantizeLinear/DequantizeLinear nodes, one graph per timestep bucket."""
