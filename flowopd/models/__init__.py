"""Model bundles behind one interface (encode prompts, velocity, decode): the tiny pixel-space SD3 transformer and
Stable Diffusion 3.5 with LoRA adapters; loading model artifacts as bundles. Import the submodule you need (the
model libraries are heavy)."""
