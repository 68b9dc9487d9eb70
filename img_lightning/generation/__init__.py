"""Image generation for evaluation: base images, IMG re-generation and the control arm."""
