"""The built-in pipeline specs and synth recipes (`latte-ray pipelines` lists them), shipped as package data of
`latte_ray.pipelines`; latte_ray/resources.py finds them in a wheel, an editable install and a checkout alike."""
