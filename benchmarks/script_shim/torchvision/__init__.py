"""Stand-ins for the few torchvision transforms diffusers' train_dreambooth_lora_sdxl.py uses, so the benchmark runs
the script itself beside the CPU torch (PyPI's torchvision wheel fails to register its C++ ops against it).
Same operations and the same RNG draws (torch's global generator) as torchvision's, on PIL images."""

__version__ = "0.0-benchmark-shim"
