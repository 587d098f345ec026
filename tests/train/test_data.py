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
def test_a_trainer_cache_of_another_recipe_is_refused(run, tmp_path, key, value):
    """A cache the trainer wrote is this run's data only for the settings that made it: another
    guidance scale, step count, seed or count would silently train on other data."""
    config, world, path, latents, recipe = run
    _write(path, latents, dict(recipe, writer="run"))
    prepare_teacher_data(world, config, log=lambda *_: None)   # the same recipe: used
    assert torch.equal(world._latents[0], latents)
    changed = load_config("tiny", None, ["data.source=teacher", f"data.latents_cache={path.parent}",
                                         f"run.out_dir={tmp_path / 'other'}", "data.num_teacher_latents=3",
                                         f"{key}={value}"])
    with pytest.raises(ValueError, match=f"data.latents_cache: .* other settings than this run's: .*{key[:12]}"):
        prepare_teacher_data(world, changed, log=lambda *_: None)


@pytest.mark.parametrize("key, value", [("eval.teacher_steps", "[7]"), ("run.seed", "5")])
def test_a_resumed_run_trains_on_its_own_data(run, tmp_path, key, value):
    """A resume may change run.seed and eval.teacher_steps: the run keeps the data it trained on
    (recorded in its folder), refuses a cache that another run has since replaced, and makes a
    missing one again from the recorded recipe, not from the changed settings."""
    config, world, path, latents, recipe = run
    prepare_teacher_data(world, config, log=lambda *_: None)   # generates and records the recipe
    own = world._latents[0].clone()
    assert read_info(path) == dict(recipe, writer="run")
    resumed = load_config("tiny", None, ["data.source=teacher", f"data.latents_cache={path.parent}",
                                         f"run.out_dir={tmp_path / 'run'}", "data.num_teacher_latents=3",
                                         f"{key}={value}"])
    prepare_teacher_data(world, resumed, log=lambda *_: None, resume=True)   # its own data: used
    assert torch.equal(world._latents[0], own)
    other = dict(recipe, writer="run", seed=recipe["seed"] + 1)   # another run's, since
    _write(path, latents, other)
    with pytest.raises(ValueError, match="other settings than the data this run trained on"):
        prepare_teacher_data(world, resumed, log=lambda *_: None, resume=True)
    path.unlink()
    prepare_teacher_data(world, resumed, log=lambda *_: None, resume=True)   # made again, as recorded
    assert read_info(path) == dict(recipe, writer="run")
    torch.testing.assert_close(world._latents[0], own)


def test_without_guidance_the_scale_is_not_part_of_the_recipe(run):
    config, world, _, _, _ = run
    config.method.guidance.mode = "none"
    a = teacher_recipe(config, world.train_prompts(), 3, 2, 0)
    config.method.guidance.scales = (7.0,)
    assert teacher_recipe(config, world.train_prompts(), 3, 2, 0) == a and a["guidance_scale"] is None


def test_a_generated_dataset_of_another_recipe_is_used_with_a_note(run):
    """A file of `meanflow generate-data` is a dataset made on purpose: another sampling recipe is
    named in the log, not refused; another teacher or revision is refused."""
    config, world, path, latents, recipe = run
    _write(path, latents, dict(recipe, writer="generate-data", steps=50, num=3))
    notes = []
    prepare_teacher_data(world, config, log=notes.append)
    assert torch.equal(world._latents[0], latents)
    assert any("max(eval.teacher_steps) 50" in line for line in notes if line.startswith("note:"))
    for key, value in (("teacher", "some/other-teacher"), ("revision", "0123abc")):
        _write(path, latents, dict(recipe, writer="generate-data", **{key: value}))
        with pytest.raises(ValueError, match=f"other settings than this run's: model.{key}"):
            prepare_teacher_data(world, config, log=lambda *_: None)


def test_a_cache_of_an_older_version_is_checked_on_what_it_records(run):
    """Files that record no recipe (older versions) are compared on what they do record."""
    config, world, path, latents, _ = run
    _write(path, latents, {"steps": 2, "guidance": "embedded"})
    prepare_teacher_data(world, config, log=lambda *_: None)
    assert torch.equal(world._latents[0], latents)
    _write(path, latents, {"teacher": "some/other-teacher"})
    with pytest.raises(ValueError, match="other settings than this run's: model.teacher"):
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
