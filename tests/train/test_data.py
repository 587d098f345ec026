"""meanflow.train.data: the order in which teacher latents take their prompts."""
import torch

from meanflow.train.data import prompt_order


def test_prompt_order_uses_every_prompt_evenly():
    g = torch.Generator().manual_seed(0)
    for count, num in ((7, 7), (7, 20), (10, 3)):
        order = prompt_order(count, num, g)
        uses = torch.bincount(torch.tensor(order), minlength=count)
        assert len(order) == num and uses.max() - uses.min() <= 1
    assert prompt_order(5, 10, torch.Generator().manual_seed(1)) != prompt_order(5, 10, torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------------------------
# The teacher-latents cache and its recipe
# --------------------------------------------------------------------------------------------

import pytest  # noqa: E402

from meanflow.train.config import load_config  # noqa: E402
from meanflow.train.data import (LATENTS_FILE, prepare_teacher_data, read_info, save_latents,  # noqa: E402
                                 teacher_recipe)
from meanflow.train.world import make_world  # noqa: E402


@pytest.fixture
def run(tmp_path):
    """A tiny digits run whose teacher latents are cached in tmp_path/cache, and a 3-latent file
    there as the trainer would write it for this run's recipe."""
    config = load_config("tiny", None, ["data.source=teacher", f"data.latents_cache={tmp_path / 'cache'}",
                                        f"run.out_dir={tmp_path / 'run'}", "data.num_teacher_latents=3"])
    world = make_world(config)
    recipe = teacher_recipe(config, world.train_prompts(), 3, max(config.eval.teacher_steps), config.run.seed)
    path = tmp_path / "cache" / LATENTS_FILE
    latents = torch.randn(3, *world.latent_shape)
    return config, world, path, latents, recipe


def _write(path, latents, info):
    save_latents(path, latents, ["a handwritten digit one"] * 3, info)


@pytest.mark.parametrize("key, value", [
    ("method.guidance.scales", "[3.0]"), ("eval.teacher_steps", "[7]"), ("run.seed", "5"),
    ("data.num_teacher_latents", "4"),
])
def test_a_trainer_cache_of_another_recipe_is_refused(run, key, value):
    """A cache the trainer wrote is this run's data only for the settings that made it: another
    guidance scale, step count, seed or count would silently train on other data."""
    config, world, path, latents, recipe = run
    _write(path, latents, dict(recipe, writer="run"))
    prepare_teacher_data(world, config, log=lambda *_: None)   # the same recipe: used
    assert torch.equal(world._latents[0], latents)
    changed = load_config("tiny", None, ["data.source=teacher", f"data.latents_cache={path.parent}",
                                         "data.num_teacher_latents=3", f"{key}={value}"])
    with pytest.raises(ValueError, match="data.latents_cache: .* made with"):
        prepare_teacher_data(world, changed, log=lambda *_: None)
    notes = []   # on resume the cache is the run's own data: used, with a note
    prepare_teacher_data(world, changed, log=notes.append, resume=True)
    assert any(line.startswith("note:") for line in notes)


def test_a_generated_dataset_of_another_recipe_is_used_with_a_note(run):
    """A file of `meanflow generate-data` is a dataset made on purpose: another sampling recipe is
    named in the log, not refused; another teacher or revision is refused."""
    config, world, path, latents, recipe = run
    _write(path, latents, dict(recipe, writer="generate-data", steps=50, num=3))
    notes = []
    prepare_teacher_data(world, config, log=notes.append)
    assert torch.equal(world._latents[0], latents)
    assert any("steps 50" in line for line in notes if line.startswith("note:"))
    for key, value in (("teacher", "some/other-teacher"), ("revision", "0123abc")):
        _write(path, latents, dict(recipe, writer="generate-data", **{key: value}))
        with pytest.raises(ValueError, match=f"made with {key}"):
            prepare_teacher_data(world, config, log=lambda *_: None)


def test_a_cache_of_an_older_version_is_checked_on_what_it_records(run):
    """Files that record no recipe (older versions) are compared on what they do record."""
    config, world, path, latents, _ = run
    _write(path, latents, {"steps": 2, "guidance": "embedded"})
    prepare_teacher_data(world, config, log=lambda *_: None)
    assert torch.equal(world._latents[0], latents)
    _write(path, latents, {"teacher": "some/other-teacher"})
    with pytest.raises(ValueError, match="made with teacher"):
        prepare_teacher_data(world, config, log=lambda *_: None)


def test_the_trainer_records_the_recipe_it_generated_with(run):
    config, world, path, _, recipe = run
    prepare_teacher_data(world, config, log=lambda *_: None)
    assert read_info(path) == dict(recipe, writer="run")
    assert world._latents[0].shape == (3, *world.latent_shape)


def test_an_unreadable_cache_is_refused_by_name(tmp_path):
    path = tmp_path / LATENTS_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="data.latents_cache: .*not a latents file"):
        read_info(path)
