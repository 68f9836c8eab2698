"""`python -m latte_ray ...` is `latte-ray ...`: the entrypoint for `ray job submit` when the package is shipped as
a wheel (runtime env `py_modules`) or installed in the image, with no console script or checkout needed."""

from latte_ray.cli import main

if __name__ == "__main__":
    main()
