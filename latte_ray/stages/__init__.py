"""Ray Data stages, one UDF per file, in dataflow order: prepare -> text_encode -> denoise -> encode ->
[sample_frames -> score] -> write; `latte-ray score`: sample_frames -> score -> write_scores."""

from latte_ray.stages.denoise import DenoiseStage
from latte_ray.stages.encode import EncodeStage
from latte_ray.stages.prepare import PrepareStage
from latte_ray.stages.sample_frames import SampleFramesStage
from latte_ray.stages.score import ScoreStage
from latte_ray.stages.text_encode import TextEncodeStage
from latte_ray.stages.write import WriteStage
from latte_ray.stages.write_scores import WriteScoresStage

__all__ = ["PrepareStage", "TextEncodeStage", "DenoiseStage", "EncodeStage", "SampleFramesStage", "ScoreStage",
           "WriteStage", "WriteScoresStage"]
