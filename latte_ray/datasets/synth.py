"""Synthetic datasets: a recipe of prompt templates x attribute lists -> prompts -> videos -> training shards.

    recipe.yaml --expand--> OUTPUT/prompts/part-*.parquet   (deduplicated, ids from the content)
                --run-----> OUTPUT/videos/, OUTPUT/manifest/  (runner.run: same resume semantics)
                --export--> OUTPUT/dataset/shards/*.tar + OUTPUT/dataset/index.parquet

Ids come from the content alone (prompt, negative prompt, variant), so expanding the same recipe again gives
the same ids and a re-run only generates what is missing. The sampler is seeded (`random.Random`, whose
stream is stable across Python versions), so the same recipe always expands to the same prompt set.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import string
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latte_ray.record.output import require_output
from latte_ray.errors import InputError, OutputBindingError
from latte_ray.spec import PIPELINES_DIR, PipelineSpec, RunSpec, SpecError, _format_errors, load_pipeline_spec
from latte_ray.record.storage import filesystem, write_atomic

log = logging.getLogger(__name__)

PROMPTS_DIR = "prompts"
ROWS_PER_PROMPT_FILE = 100_000
MAX_ENUMERATED = 1_000_000  # a template's full product is enumerated only up to this size
PROMPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("template", pa.string()),
        ("attributes", pa.string()),  # JSON object: attribute name -> value
        ("variant", pa.int32()),
    ]
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemplateSpec(_Strict):
    """One prompt template: a string with {attribute} placeholders, or a mapping with these fields."""

    text: str = Field(..., description="Prompt text with {attribute} placeholders ({{ and }} for literal braces).")
    name: str | None = Field(None, description="Name recorded with each prompt (default: t0, t1, ... by position).")
    weight: float = Field(1.0, gt=0, description="Relative share of sampled prompts that use this template.")
    limit: int | None = Field(None, ge=1, description="At most this many prompts from this template.")

    @property
    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]


class ExportSpec(_Strict):
    """Which videos the export packs into WebDataset shards, and what each sample carries."""

    samples_per_shard: int = Field(1000, ge=1, description="Most samples in one WebDataset tar shard.")
    max_shard_bytes: int = Field(1_000_000_000, ge=1, description="Start a new shard once one reaches this size.")
    min_motion: float | None = Field(None, ge=0, description="Leave out videos whose motion_score is below this.")
    drop_blank: bool = Field(False, description="Leave out videos with any blank (near-uniform) frame.")
    min_clip_score: float | None = Field(None, description="Leave out videos whose clip_score is below this "
                                         "(needs scores: the recipe's `scoring`, or `latte-ray score`).")
    min_aesthetic: float | None = Field(None, description="Leave out videos whose aesthetic_score is below this.")
    with_embeddings: bool = Field(False, description="Put each prompt's T5 embeddings in its sample (<key>.t5.npy); "
                                  "the run keeps them for new videos (spec sidecars.embeddings).")
    with_latents: bool = Field(False, description="Put each video's final latents in its sample (<key>.latents.npy); "
                               "the run keeps them for new videos (spec sidecars.latents).")


class Recipe(_Strict):
    """A synthetic dataset: which prompts (templates x attributes), generated with which pipeline."""

    name: str = Field("synth", description="Dataset name, recorded in recipe.json.")
    description: str = Field("", description="One line on what the recipe makes (`latte-ray pipelines` lists it).")
    pipeline: str = Field("tiny-cpu", description="Pipeline spec: a name in pipelines/ or a YAML path "
                          "(relative paths are taken from the recipe's folder).")
    seed: int = Field(0, ge=0, description="Seeds the sampler and is the run seed the video seeds derive from.")
    templates: list[TemplateSpec] = Field(..., min_length=1, description="Prompt templates (a string or a mapping).")
    attributes: dict[str, list[str] | dict[str, float]] = Field(
        default_factory=dict,
        description="Attribute name -> values: a list (equal weights) or a mapping of value -> weight.",
    )
    samples: int | None = Field(
        None, ge=1, description="Draw this many distinct prompts (weighted, seeded); null: every combination "
        "of every template, each capped by its limit.",
    )
    videos_per_prompt: int = Field(1, ge=1, le=1000, description="Videos (distinct seeds) per prompt.")
    negative_prompt: str | None = Field(None, description="Negative prompt for every row (null: the spec's).")
    export: ExportSpec = Field(default_factory=ExportSpec)
    scoring: str | None = Field(None, description="Score every video as it is generated with this scoring spec "
                                "(a YAML path or pipeline name whose `scoring` section is used; relative paths "
                                "from the recipe's folder); null: the pipeline spec's own scoring section.")

    @field_validator("templates", mode="before")
    @classmethod
    def _strings_are_templates(cls, v: object) -> object:
        return [{"text": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check_references(self) -> "Recipe":
        for name, values in self.attributes.items():
            if not name.isidentifier():
                raise ValueError(f"attributes.{name}: a name must be an identifier (letters, digits, _)")
            if not values:
                raise ValueError(f"attributes.{name}: needs at least one value")
            if isinstance(values, dict) and any(w <= 0 for w in values.values()):
                raise ValueError(f"attributes.{name}: weights must be > 0")
        for i, t in enumerate(self.templates):
            try:
                fields = t.fields
            except ValueError as e:
                raise ValueError(f"templates.{i}: {e} in {t.text!r}") from None
            for f in fields:
                if f not in self.attributes:
                    raise ValueError(f"templates.{i}: placeholder {{{f}}} is not an attribute "
                                     f"(attributes: {sorted(self.attributes)})")
        names = [self.template_name(i) for i in range(len(self.templates))]
        if len(set(names)) != len(names):
            raise ValueError(f"templates: names must be unique, got {names}")
        return self

    def template_name(self, index: int) -> str:
        return self.templates[index].name or f"t{index}"

    def weighted_values(self, attribute: str) -> tuple[list[str], list[float]]:
        values = self.attributes[attribute]
        if isinstance(values, dict):
            return list(values), list(values.values())
        return list(values), [1.0] * len(values)


def resolve_recipe_url(url: str) -> str:
    """A recipe's URL or path as given, or the built-in recipe of that name ('synth-example' ->
    pipelines/synth-example.yaml, shipped in the package) when no such local file exists."""
    builtin = PIPELINES_DIR / f"{url}.yaml"
    if "://" not in url and "/" not in url and not Path(url).exists() and builtin.is_file():
        return str(builtin)
    return url


def load_recipe(url: str, storage_options: dict | None = None) -> tuple[Recipe, str]:
    """The recipe and its raw text, from a local path, an fsspec URL or a built-in name; SpecError names the
    field."""
    url = resolve_recipe_url(url)
    try:
        fs, path = filesystem(url, storage_options)
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise InputError(f"recipe {url!r} does not exist") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{url}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{url}: a recipe must be a mapping, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw), text
    except ValidationError as e:
        raise SpecError(f"{url}: invalid recipe:\n{_format_errors(e)}") from None


def recipe_pipeline(recipe: Recipe, recipe_url: str, override: str | None = None) -> PipelineSpec:
    name = override or recipe.pipeline
    local = Path(recipe_url).parent / name
    if not override and "://" not in recipe_url and local.suffix in (".yaml", ".yml") and local.exists():
        return load_pipeline_spec(local)
    return load_pipeline_spec(name)


# ------------------------------------------------------------------ expansion


def synth_id(prompt: str, negative_prompt: str | None, variant: int) -> str:
    """A stable id from the content: the same prompt, negative prompt and variant give the same id."""
    key = json.dumps([prompt, negative_prompt, variant], ensure_ascii=False)
    return "s" + hashlib.sha256(key.encode()).hexdigest()[:24]


def expand(recipe: Recipe) -> pa.Table:
    """The recipe's prompt table: one row per (distinct prompt, variant), sorted by id."""
    sampler = _Sampler(recipe)
    if recipe.samples is None:
        chosen = [item for i, t in enumerate(recipe.templates) for item in sampler.draw(i, t.limit)]
    else:
        chosen = sampler.sample(recipe.samples)
    rows: dict[str, dict] = {}
    for template_index, values in chosen:
        prompt = recipe.templates[template_index].text.format(**values)
        for variant in range(recipe.videos_per_prompt):
            video_id = synth_id(prompt, recipe.negative_prompt, variant)
            rows.setdefault(video_id, {  # two templates can spell the same prompt: the first one keeps it
                "id": video_id, "prompt": prompt, "negative_prompt": recipe.negative_prompt,
                "template": recipe.template_name(template_index),
                "attributes": json.dumps(values, ensure_ascii=False, sort_keys=True), "variant": variant,
            })
    return pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=PROMPT_SCHEMA)


class _Sampler:
    """Seeded weighted draws of distinct (template, attribute assignment) pairs."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.rng = random.Random(recipe.seed)
        self.pools = {}  # attribute -> (values, cumulative weights), for rng.choices
        for name in recipe.attributes:
            values, weights = recipe.weighted_values(name)
            self.pools[name] = (values, list(itertools.accumulate(weights)))
        self.fields = [list(dict.fromkeys(t.fields)) for t in recipe.templates]
        self.space = [math.prod(len(recipe.attributes[f]) for f in fs) for fs in self.fields]
        self.seen: set[tuple] = set()

    def draw(self, index: int, k: int | None) -> list[tuple[int, dict]]:
        """Up to k unseen assignments for one template, by weight without replacement (all of them when k
        is None or covers them); marks them seen."""
        fields, space = self.fields[index], self.space[index]
        out: list[tuple[int, dict]] = []

        def take(values: dict) -> None:
            key = (index, tuple(sorted(values.items())))
            if key not in self.seen:
                self.seen.add(key)
                out.append((index, values))

        if k is not None and k < space:  # rejection draws: cheap while most combinations are unseen
            for _ in range(20 * k + 100):
                take({f: self.rng.choices(self.pools[f][0], cum_weights=self.pools[f][1])[0] for f in fields})
                if len(out) == k:
                    return out
        if space > MAX_ENUMERATED:
            if k is not None:
                return out
            raise SpecError(f"template {self.recipe.template_name(index)!r} has {space} combinations: "
                            f"set `samples` or the template's `limit`")
        columns = [list(zip(*self.recipe.weighted_values(f))) for f in fields]
        rest = [dict(zip(fields, (v for v, _ in combo))) for combo in itertools.product(*columns)]
        weights = [math.prod(w for _, w in combo) for combo in itertools.product(*columns)]
        unseen = [(v, w) for v, w in zip(rest, weights) if (index, tuple(sorted(v.items()))) not in self.seen]
        if k is not None and len(out) + len(unseen) > k:
            # Weighted sampling without replacement (Efraimidis-Spirakis: the k largest u ** (1 / w)).
            unseen = sorted(unseen, key=lambda vw: -self.rng.random() ** (1.0 / vw[1]))[: k - len(out)]
        for values, _ in unseen:
            take(values)
        return out

    def sample(self, n: int) -> list[tuple[int, dict]]:
        """n distinct prompts: each draw picks a template by weight among those under their limit and not
        exhausted, then its attribute values by weight. Fewer when the recipe has fewer distinct prompts."""
        templates = self.recipe.templates
        capacity = [min(space, t.limit or space) for space, t in zip(self.space, templates)]
        taken = [0] * len(templates)
        texts: set[str] = set()
        out: list[tuple[int, dict]] = []
        misses = 0
        while len(out) < n and misses < 50 * n + 1000:
            open_ = [i for i in range(len(templates)) if taken[i] < capacity[i]]
            if not open_:
                break
            i = self.rng.choices(open_, [templates[j].weight for j in open_])[0]
            drawn = self.draw(i, 1)
            if not drawn:
                capacity[i] = taken[i]  # no unseen combination left
                continue
            text = templates[i].text.format(**drawn[0][1])
            if text in texts:  # two templates can spell the same prompt
                misses += 1
                continue
            texts.add(text)
            taken[i] += 1
            out.append(drawn[0])
        if len(out) < n:
            log.warning("recipe %s: asked for %d prompts, it has %d distinct ones", self.recipe.name, n, len(out))
        return out


# ------------------------------------------------------------------ the whole flow


@dataclass
class SynthSummary:
    prompts: int
    run: object  # runner.RunSummary, or None when generation was skipped
    export: object  # export.ExportSummary

    def lines(self) -> list[str]:
        out = [f"synth: {self.prompts} prompts"]
        if self.run is not None:
            out.append(self.run.line())
        out += self.export.lines()
        return out


def _check_owned(output: str, storage_options: dict | None) -> None:
    """synth rewrites OUTPUT/prompts/part-*.parquet and OUTPUT/recipe.yaml: refuse a folder where they
    exist but were not written by synth (no output record, and no recipe.yaml next to the prompts)."""
    from latte_ray.record.output import open_output, read_legacy_record, read_record

    out = open_output(output, storage_options)
    if read_record(out) is not None or read_legacy_record(out) is not None:
        return
    fs, root = out.fs, out.layout.root
    prompts = f"{root}/{PROMPTS_DIR}"
    if fs.exists(prompts) and fs.ls(prompts) and not fs.exists(f"{root}/recipe.yaml"):
        raise OutputBindingError(f"synth: {output.rstrip('/')}/{PROMPTS_DIR}/ holds files and {output} is not a latte-ray "
                        f"output; refusing to replace them (give a new or empty --output)")


def write_prompt_table(table: pa.Table, output: str, storage_options: dict | None = None) -> str:
    """Write the table as OUTPUT/prompts/part-*.parquet, removing parts a previous expansion left."""
    import io

    import pyarrow.parquet as pq

    fs, root = filesystem(output, storage_options)
    folder = f"{root.rstrip('/')}/{PROMPTS_DIR}"
    written = []
    for n, start in enumerate(range(0, table.num_rows, ROWS_PER_PROMPT_FILE)):
        sink = io.BytesIO()
        pq.write_table(table.slice(start, ROWS_PER_PROMPT_FILE), sink, compression="zstd")
        path = f"{folder}/part-{n:05d}.parquet"
        write_atomic(fs, path, sink.getvalue())
        written.append(path.strip("/"))
    for stale in fs.glob(f"{folder}/part-*.parquet"):
        if stale.strip("/") not in written:
            fs.rm_file(stale)
    return f"{output.rstrip('/')}/{PROMPTS_DIR}/"


def synthesize(
    recipe_url: str,
    output: str,
    pipeline: str | None = None,
    storage_options: dict | None = None,
    min_motion: float | None = None,
    drop_blank: bool | None = None,
    cache_dir: str | None = None,
    generate: bool = True,
    min_clip_score: float | None = None,
    min_aesthetic: float | None = None,
    with_embeddings: bool | None = None,
    with_latents: bool | None = None,
    scoring: str | None = None,
    console=None,
    lease=None,
) -> SynthSummary:
    """Expand the recipe, generate what is missing (resume), and export the dataset shards, holding the
    output's lease throughout (`lease`: a record/lease.Policy; default: take it, refuse if held). `console`:
    the CLI's (latte_ray/console.py), handed to the run."""
    from latte_ray import runner
    from latte_ray.datasets.export import export_dataset

    recipe_url = resolve_recipe_url(recipe_url)
    recipe, text = load_recipe(recipe_url, storage_options)
    spec = recipe_pipeline(recipe, recipe_url, pipeline)
    ex = recipe.export
    pick = lambda given, default: default if given is None else given  # noqa: E731
    min_clip_score, min_aesthetic = pick(min_clip_score, ex.min_clip_score), pick(min_aesthetic, ex.min_aesthetic)
    with_embeddings, with_latents = pick(with_embeddings, ex.with_embeddings), pick(with_latents, ex.with_latents)
    spec = _dataset_spec(spec, recipe, recipe_url, scoring, with_embeddings, with_latents)
    if generate and not spec.scoring.enabled and (min_clip_score is not None or min_aesthetic is not None):
        raise SpecError(f"recipe {recipe_url!r}: the export filters on scores but nothing scores the videos: set "
                        f"the recipe's `scoring` (e.g. scoring: tiny-cpu) or pass --scoring")
    table = expand(recipe)
    if table.num_rows == 0:
        raise SpecError(f"recipe {recipe_url!r} expands to no prompts")
    prompts_url = f"{output.rstrip('/')}/{PROMPTS_DIR}/"
    run = RunSpec(pipeline=spec, prompts=[prompts_url], output=output, storage_options=storage_options or {},
                  seed=recipe.seed, cache_dir=cache_dir)
    if generate:  # every check a run makes but the table's, before anything is written
        runner.preflight(run, tables=False)
    else:
        require_output(output, storage_options)
    _check_owned(output, storage_options)
    # One writer per output (record/lease.py): taken before the prompt table is written, held to the end.
    from latte_ray.record.lease import Policy, Terms, hold_output
    from latte_ray.record.output import new_run_id, open_output

    run_id = new_run_id()
    policy = lease or Policy()
    with hold_output(open_output(output, storage_options), run_id, "synth", Terms.of(spec.execution),
                           policy) as held:
        write_prompt_table(table, output, storage_options)
        fs, root = filesystem(output, storage_options)
        write_atomic(fs, f"{root.rstrip('/')}/recipe.yaml", text.encode())
        summary = runner.run(run, held or Policy(take=False), run_id=run_id, console=console) if generate else None
        exported = export_dataset(
            output, storage_options=storage_options, prompts_url=prompts_url,
            min_motion=recipe.export.min_motion if min_motion is None else min_motion,
            drop_blank=recipe.export.drop_blank if drop_blank is None else drop_blank,
            samples_per_shard=recipe.export.samples_per_shard, max_shard_bytes=recipe.export.max_shard_bytes,
            min_clip_score=min_clip_score, min_aesthetic=min_aesthetic, with_embeddings=with_embeddings,
            with_latents=with_latents, name=recipe.name,
            scoring_hash=spec.scoring.scoring_hash() if spec.scoring.enabled else None,
        )
    return SynthSummary(prompts=table.num_rows, run=summary, export=exported)


def _dataset_spec(spec: PipelineSpec, recipe: Recipe, recipe_url: str, scoring: str | None, embeddings: bool,
                  latents: bool) -> PipelineSpec:
    """The pipeline spec with what the export needs decided at generation time: scoring on when the recipe
    (or --scoring) names a scorer, and the sidecars the export will pack kept (neither is in the spec hash)."""
    from latte_ray.datasets.scoring import load_scoring_spec
    from latte_ray.spec import SidecarSpec

    name = scoring or recipe.scoring
    update: dict = {"sidecars": SidecarSpec(embeddings=spec.sidecars.embeddings or embeddings,
                                            latents=spec.sidecars.latents or latents)}
    if name:
        local = Path(recipe_url).parent / name
        if not scoring and "://" not in recipe_url and local.suffix in (".yaml", ".yml") and local.exists():
            name = str(local)
        update["scoring"] = load_scoring_spec(name).model_copy(update={"enabled": True})
    return spec.model_copy(update=update)
