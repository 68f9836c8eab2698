"""The example prompt table (`latte-ray run` with no --prompts), shipped as package data of `latte_ray.examples`."""
