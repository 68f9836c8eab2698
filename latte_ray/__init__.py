"""latte-ray: batch text-to-video generation with Latte on Ray Data."""


def __getattr__(name: str):
    if name == "__version__":  # computed on first use (latte_ray.versions: pyproject.toml's version)
        from latte_ray.versions import version

        return version()
    if name == "verify":  # latte_ray.verify(output, deep=..., repair=...): docs/verify.md
        from latte_ray.record.verify import verify

        return verify
    raise AttributeError(f"module 'latte_ray' has no attribute {name!r}")
