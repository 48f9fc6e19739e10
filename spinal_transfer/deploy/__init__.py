"""Export (ONNX, TorchScript, safetensors bundles), int8 quantization, predict and `Predictor`."""
