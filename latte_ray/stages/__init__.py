"""Ray Data stages, one UDF per file, in dataflow order: prepare -> text_encode -> denoise -> encode -> write."""

from latte_ray.stages.denoise import DenoiseStage
from latte_ray.stages.encode import EncodeStage
from latte_ray.stages.prepare import PrepareStage
from latte_ray.stages.text_encode import TextEncodeStage
from latte_ray.stages.write import WriteStage

__all__ = ["PrepareStage", "TextEncodeStage", "DenoiseStage", "EncodeStage", "WriteStage"]
