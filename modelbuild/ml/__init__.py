"""Machine-learning code that several passes share (records and templates today).

A pass imports from here, never from another pass: a pass's action key follows the modelbuild
modules it imports, so editing one pass (say the LoRA training loop) must not invalidate the
cached outputs of the passes that only share its record format. Nothing at module level here
may import torch, transformers or onnx: pass modules are imported on every ``doit`` call.
"""
