"""Plain-PyTorch math for every genfast op: the ground truth for tests, the "reference"
backend, and the differentiable path for double backward."""
