"""The inference service: resolve the model, build the prompt, schedule, stream."""
