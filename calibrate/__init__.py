"""DilateQuant calibration in PyTorch: weight dilation, per-timestep quantizers, block-wise distillation."""
