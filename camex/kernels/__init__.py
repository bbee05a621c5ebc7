"""Hand-written accelerator kernels (Triton). Pure tensor maths: nothing here imports the rest of camex."""
