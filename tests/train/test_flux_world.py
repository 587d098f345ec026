"""FluxWorld and MeanFlowFluxPipeline on a tiny FLUX pipeline built offline (no hub access):
conditioning, teacher latents, the image–caption dataset and its cache, decoding, few-step
sampling with an exported student, and a short ``distill`` run through the trainer."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel)
from PIL import Image  # noqa: E402

from meanflow.models.flux_student import FluxStudent  # noqa: E402
from meanflow.models.pipeline import MeanFlowFluxPipeline, pack_latents, unpack_latents  # noqa: E402
from meanflow.train.config import load_config  # noqa: E402
from meanflow.train.flux_world import DATASET_LATENTS_FILE, FluxWorld, load_image  # noqa: E402

RES = 32          # pixels; VAE scale factor 2, so (32/4)² = 64 packed tokens of 16 channels
N_IMG, C = 64, 16
T5_LEN = 16
WORDS = ("a an the photo of cat dog red blue green small large painting on in with and tree house car sky "
         "sunset over lake portrait").split()
PROMPTS = ["a red cat", "a photo of a dog on a tree", "a blue car", "sunset over a lake",
           "a small house", "a green tree", "a large dog", "a painting of a cat", "a portrait of a dog"]


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[BOS]", "[PAD]", "[EOS]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", bos_token="[BOS]", model_max_length=max_length)


def _tiny_pipeline() -> FluxPipeline:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=C, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=(4, 6, 6), guidance_embeds=True)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=1000, projection_dim=32,
                                        bos_token_id=0, pad_token_id=1, eos_token_id=2)).eval()
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                 vocab_size=1000)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.5,
                        shift_factor=0.1)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=_tokenizer(77), text_encoder_2=t5, tokenizer_2=_tokenizer(T5_LEN),
                        transformer=transformer)


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_single_threaded():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    yield
    dlog.set_verbosity(levels[0])
    tlog.set_verbosity(levels[1])
    dlog.enable_progress_bar()
    tlog.enable_progress_bar()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")   # no Triton interpreter on the CPU


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A tiny FluxPipeline saved with save_pretrained (once per module)."""
    path = tmp_path_factory.mktemp("tiny-flux") / "pipeline"
    _tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    """The tiny pipeline loaded back from its folder, as a user's would be."""
    return FluxPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# tiny prompts\n" + "\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return path


def _config(pipe_dir, prompt_file, tmp_path, *overrides):
    return load_config("tiny", None, ["model.kind=flux", f"model.teacher={pipe_dir}",
                                      f"data.prompts={prompt_file}", "data.source=teacher",
                                      f"run.out_dir={tmp_path / 'run'}", "run.eval_at_end=false",
                                      "method.guidance.mode=embedded", "method.guidance.scales=[3.5]",
                                      "sample.shift=flux", *overrides])


@pytest.fixture
def world(pipe, pipe_dir, prompt_file, tmp_path):
    return FluxWorld(_config(pipe_dir, prompt_file, tmp_path), "cpu", pipeline=pipe, resolution=RES,
                     log=lambda *_: None)


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------

def test_condition_shapes_and_teacher(world, pipe):
    assert world.name == "flux" and world.latent_shape == (N_IMG, C)
    assert world.vae_scale_factor == pipe.vae_scale_factor == 2
    cond = world.condition(["a red cat", "a photo of a dog on a tree", ""])
    assert cond.encoder_hidden_states.shape == (3, T5_LEN, 32)
    assert cond.pooled_projections.shape == (3, 32)
    assert cond.txt_ids.shape == (T5_LEN, 3) and not cond.txt_ids.any()
    assert cond.img_ids.dtype == torch.float32
    expected_ids = FluxPipeline._prepare_latent_image_ids(1, RES // 4, RES // 4, "cpu", torch.float32)
    assert torch.equal(cond.img_ids, expected_ids)
    assert cond.encoder_hidden_states.dtype == torch.float32
    # guidance: the first configured scale, so that the trainer's preview sampler works as is.
    assert torch.equal(cond.guidance, torch.full((3,), 3.5))
    embeds, pooled, _ = pipe.encode_prompt(prompt=["a red cat"], prompt_2=None, device="cpu",
                                           max_sequence_length=T5_LEN)
    torch.testing.assert_close(cond.encoder_hidden_states[:1], embeds)
    torch.testing.assert_close(cond.pooled_projections[:1], pooled)
    assert world.eval_prompts() == PROMPTS[:8] and world.train_prompts() == PROMPTS
    v = world.teacher.velocity(torch.randn(3, N_IMG, C), torch.full((3,), 0.7), cond)
    assert v.shape == (3, N_IMG, C) and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="prompts"):
        world.condition([])


def test_construction_errors(pipe, pipe_dir, prompt_file, tmp_path, monkeypatch):
    config = _config(pipe_dir, prompt_file, tmp_path)
    with pytest.raises(ValueError, match="resolution"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=30)
    config.model.resolution = 30  # not a multiple of 2 × the tiny VAE scale factor
    with pytest.raises(ValueError, match="model.resolution"):
        FluxWorld(config, "cpu", pipeline=pipe)
    assert FluxWorld(config, "cpu", pipeline=pipe, resolution=(16, 32)).latent_shape == (4 * 8, C)  # height × width
    with pytest.raises(ValueError, match="default_guidance"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, default_guidance="high")
    config.model.teacher = str(tmp_path / "no-such-pipeline")
    with pytest.raises(ValueError, match="model.teacher"):
        FluxWorld(config, "cpu", resolution=RES)
    config.data.prompts = "builtin"   # the prompt list shipped with the presets
    assert len(FluxWorld(config, "cpu", pipeline=pipe, resolution=RES).train_prompts()) >= 20


def test_teacher_latents_and_training_batch(world):
    with pytest.raises(ValueError, match="use_latents"):
        world.training_batch(2, torch.Generator().manual_seed(0))
    latents = torch.randn(5, N_IMG, C, dtype=torch.float64)
    prompts = PROMPTS[:5]
    world.use_latents(latents, prompts)
    x, batch_prompts = world.training_batch(4, torch.Generator().manual_seed(3))
    rows = torch.randint(5, (4,), generator=torch.Generator().manual_seed(3))
    assert x.dtype == torch.float32 and x.shape == (4, N_IMG, C) and x.device == world.device
    torch.testing.assert_close(x, latents[rows].float())
    assert batch_prompts == [prompts[i] for i in rows.tolist()]
    with pytest.raises(ValueError, match="latents"):
        world.use_latents(torch.randn(5, N_IMG, C + 1), prompts)
    with pytest.raises(ValueError, match="prompts"):
        world.use_latents(latents, prompts[:4])
    with pytest.raises(ValueError, match="batch"):
        world.training_batch(0, torch.Generator())


def test_teacher_latents_cache_of_another_run_is_refused(pipe, pipe_dir, prompt_file, tmp_path):
    """data.latents_cache is reused by any run that names it: latents of another teacher or of
    another resolution are refused by name, not trained on (or failed on with a bare shape)."""
    from meanflow.train.data import LATENTS_FILE, prepare_teacher_data, save_latents

    cache = tmp_path / "cache"
    config = _config(pipe_dir, prompt_file, tmp_path, f"data.latents_cache={cache}")
    world = FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, log=lambda *_: None)
    prompts = PROMPTS[:3]
    save_latents(cache / LATENTS_FILE, torch.randn(3, N_IMG, C), prompts,
                 {"steps": 2, "guidance": "embedded", "teacher": str(pipe_dir)})
    prepare_teacher_data(world, config, log=lambda *_: None)   # this run's teacher and size: used
    assert world.training_data[1] == prompts
    config.model.teacher = "black-forest-labs/FLUX.1-schnell"
    with pytest.raises(ValueError, match="data.latents_cache.*teacher"):
        prepare_teacher_data(world, config, log=lambda *_: None)
    config.model.teacher = str(pipe_dir)
    save_latents(cache / LATENTS_FILE, torch.randn(3, 4 * N_IMG, C), prompts, {"steps": 2})   # 2 × RES, no teacher
    with pytest.raises(ValueError, match="data.latents_cache.*resolution"):
        prepare_teacher_data(world, config, log=lambda *_: None)


def _write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    sizes = {"b_wide": (48, 32), "a_tall": (32, 40), "c_square": (32, 32), "d_uncaptioned": (32, 32)}
    captions = {"b_wide": "a red cat", "a_tall": "a blue car\n", "c_square": "  a green tree "}
    for stem, (w, h) in sizes.items():
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        suffix = ".jpg" if stem == "c_square" else ".png"
        Image.fromarray(pixels).save(folder / f"{stem}{suffix}")
        if stem in captions:
            (folder / f"{stem}.txt").write_text(captions[stem], encoding="utf-8")
    (folder / "notes.txt").write_text("not a caption", encoding="utf-8")
    return ["a blue car", "a red cat", "a green tree"]   # sorted by file name


def test_dataset_encoded_once_and_cached(pipe, pipe_dir, prompt_file, tmp_path, monkeypatch):
    images = tmp_path / "images"
    captions = _write_images(images)
    config = _config(pipe_dir, prompt_file, tmp_path, "data.source=dataset", f"data.images={images}",
                     f"data.latents_cache={tmp_path / 'cache'}")
    world = FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, image_dir=images, log=lambda *_: None)
    latents, prompts = world.training_data
    assert latents.shape == (3, N_IMG, C) and latents.dtype == torch.float32
    assert prompts == captions
    assert (tmp_path / "cache" / DATASET_LATENTS_FILE).is_file()
    # By hand: resize + crop, the VAE's posterior mean, FLUX's shift and scale, 2×2 packing.
    pixels = load_image(images / "a_tall.png", RES, RES)
    assert pixels.shape == (3, RES, RES) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None]).latent_dist.mean
    expected = FluxPipeline._pack_latents((z - 0.1) * 0.5, 1, 4, RES // 2, RES // 2)
    torch.testing.assert_close(latents[:1], expected)
    x, batch_prompts = world.training_batch(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, N_IMG, C) and set(batch_prompts) <= set(captions)

    # A second construction reads the cache: the VAE encoder must not run (folder from the config).
    def fail(*args, **kwargs):
        raise AssertionError("the VAE encoded again despite the cache")

    monkeypatch.setattr(pipe.vae, "encode", fail)
    config.data.images = str(images)
    again = FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, log=lambda *_: None)
    assert torch.equal(again.training_data[0], latents) and again.training_data[1] == captions
    config.model.revision = "0123abc"   # the latents of another revision of the model: refused
    with pytest.raises(ValueError, match="data.latents_cache.*revision"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, log=lambda *_: None)
    config.model.revision = None
    with pytest.raises(ValueError, match="data.latents_cache"):   # the cache is of another folder
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, image_dir=tmp_path, log=lambda *_: None)
    # The folder changed since the cache was made: an edited caption, then one more image.
    (images / "b_wide.txt").write_text("a red dog", encoding="utf-8")
    with pytest.raises(ValueError, match="data.latents_cache.*images"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, log=lambda *_: None)
    (images / "b_wide.txt").write_text(captions[1], encoding="utf-8")
    assert FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, log=lambda *_: None).training_data[1] == captions
    Image.new("RGB", (8, 8)).save(images / "d_new.png")
    (images / "d_new.txt").write_text("a new picture", encoding="utf-8")
    with pytest.raises(ValueError, match="data.latents_cache.*images"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, log=lambda *_: None)


def test_a_world_for_sampling_does_not_load_the_dataset(pipe, pipe_dir, prompt_file, tmp_path, monkeypatch):
    """sample / eval of a data.source=dataset run (make_world(training=False)) neither encode
    the images nor read their cache; such a world has no training data."""
    from meanflow.train import world as world_module

    (tmp_path / "images").mkdir()   # no images: loading them would fail
    config = _config(pipe_dir, prompt_file, tmp_path, "data.source=dataset", f"data.images={tmp_path / 'images'}")

    def fail(*args, **kwargs):
        raise AssertionError("the dataset was loaded for sampling")

    monkeypatch.setattr(FluxWorld, "_dataset_latents", fail)
    world = FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, log=lambda *_: None, load_dataset=False)
    assert world.training_data is None
    with pytest.raises(ValueError, match="load_dataset=True"):
        world.training_batch(1, torch.Generator())
    monkeypatch.setattr(FluxWorld, "_load_pipeline", staticmethod(lambda config: pipe))
    config.model.resolution = RES
    assert world_module.make_world(config, torch.device("cpu"), training=False).training_data is None


def test_load_image_follows_the_exif_orientation(tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation tag; viewers (and
    diffusers' load_image) show it upright, so the latents must be of the upright image."""
    from PIL import ImageOps

    pixels = torch.randint(0, 256, (32, 48, 3), generator=torch.Generator().manual_seed(2),
                           dtype=torch.uint8).numpy()          # stored 48 wide × 32 tall
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6                                           # shown rotated: 32 wide × 48 tall
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as shown:
        upright = ImageOps.exif_transpose(shown).convert("RGB")
    assert upright.size == (32, 48)
    expected = torch.from_numpy(np.asarray(upright, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(load_image(path, 48, 32), expected)   # height 48, width 32: no resize


def test_dataset_errors(pipe, pipe_dir, prompt_file, tmp_path):
    with pytest.raises(ValueError, match="data.images"):  # the config refuses a dataset run without images
        _config(pipe_dir, prompt_file, tmp_path, "data.source=dataset")
    config = _config(pipe_dir, prompt_file, tmp_path)
    config.data.source = "dataset"  # past the config's check: the world's own
    with pytest.raises(ValueError, match="image_dir"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES)
    with pytest.raises(ValueError, match="image_dir.*no such folder"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, image_dir=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.new("RGB", (8, 8)).save(empty / "uncaptioned.png")
    with pytest.raises(ValueError, match="image_dir.*no captioned image"):
        FluxWorld(config, "cpu", pipeline=pipe, resolution=RES, image_dir=empty)


def test_decode_and_grid(world, pipe, tmp_path):
    latents = torch.randn(2, N_IMG, C)
    images = world.decode(latents)
    assert images.shape == (2, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and torch.isfinite(images).all()
    with torch.no_grad():   # FluxPipeline's own decode path
        z = FluxPipeline._unpack_latents(latents, RES, RES, 2) / 0.5 + 0.1
        expected = pipe.vae.decode(z, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(unpack_latents(pack_latents(z), RES, RES, 2), z)
    with pytest.raises(ValueError, match="latents"):
        world.decode(torch.randn(2, N_IMG + 1, C))
    path = tmp_path / "grid" / "g.png"
    world.save_grid(torch.cat([images, images, images]), str(path), nrow=4)
    with Image.open(path) as img:
        assert img.size == (4 * RES + 5 * 2, 2 * RES + 3 * 2) and img.mode == "RGB"
    with pytest.raises(ValueError, match="nrow"):
        world.save_grid(images, str(path), nrow=0)


def test_evaluator_is_refused(world):
    with pytest.raises(ValueError, match="no offline evaluator"):
        world.evaluator()


# ---------------------------------------------------------------------------------------------
# The exported pipeline
# ---------------------------------------------------------------------------------------------

def test_meanflow_pipeline_end_to_end(pipe, pipe_dir, tmp_path):
    student_dir = tmp_path / "student"
    FluxStudent.from_transformer(copy.deepcopy(pipe.transformer)).save_pretrained(student_dir)
    mf = MeanFlowFluxPipeline.from_pretrained(student_dir, base=pipe_dir)
    prompts = ["a red cat", "a blue car"]
    for steps in (1, 2, 4):
        out = mf(prompts, num_inference_steps=steps, height=RES, width=RES, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (2, 3, RES, RES) and torch.isfinite(out.images).all()
        assert out.images.min() >= 0 and out.images.max() <= 1
    pil = mf("a red cat", num_inference_steps=2, height=RES, width=2 * RES,
             generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (2 * RES, RES)

    # One step at initialisation (u(z, r, t) = v_T(z, t)) is z − v_T(z, 1) with FLUX's noise.
    z1 = mf(prompts, num_inference_steps=1, height=RES, width=RES, output_type="latent",
            generator=torch.Generator().manual_seed(5)).images
    noise, _ = pipe.prepare_latents(2, 4, RES, RES, torch.float32, "cpu", torch.Generator().manual_seed(5))
    cond = mf.encode_prompt(prompts, RES, RES)
    cond.guidance = torch.full((2,), 3.5)
    from meanflow.models.flux_student import FluxTeacher
    v = FluxTeacher(copy.deepcopy(pipe.transformer)).velocity(noise, torch.ones(2), cond)
    assert z1.shape == (2, N_IMG, C)
    torch.testing.assert_close(z1, noise - v, rtol=1e-5, atol=1e-5)

    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            mf("a cat", num_inference_steps=bad, height=RES, width=RES)
    with pytest.raises(ValueError, match="height, width"):
        mf("a cat", num_inference_steps=1, height=30, width=RES)
    with pytest.raises(ValueError, match="output_type"):
        mf("a cat", num_inference_steps=1, height=RES, width=RES, output_type="jpeg")

    # save_pretrained records the base, so from_pretrained(dir) alone works.
    exported = tmp_path / "exported"
    mf.save_pretrained(exported)
    again = MeanFlowFluxPipeline.from_pretrained(exported)
    z2 = again(prompts, num_inference_steps=1, height=RES, width=RES, output_type="latent",
               generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(z2, z1)
    with pytest.raises(ValueError, match="base"):
        MeanFlowFluxPipeline.from_pretrained(student_dir)

    # bfloat16 weights: the state stays float32, the student runs in bf16.
    bf16 = MeanFlowFluxPipeline.from_pretrained(exported, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.base_pipeline.vae.dtype == torch.bfloat16
    z3 = bf16(prompts, num_inference_steps=2, height=RES, width=RES, output_type="latent",
              generator=torch.Generator().manual_seed(5)).images
    assert z3.dtype == torch.float32 and torch.isfinite(z3).all()


def test_meanflow_pipeline_matches_flux_pipeline(pipe):
    """A student at initialisation (u(z, r, t) = v_T(z, t)) samples exactly as diffusers'
    FluxPipeline does with FLUX.1-dev's scheduler: the same noise from the same generators, the
    shifted grid, guidance, prompt order with num_images_per_prompt, the decode."""
    # The module's pipeline components, with FLUX.1-dev's scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    base = FluxPipeline(**{**pipe.components, "scheduler": scheduler})
    mf = MeanFlowFluxPipeline(FluxStudent.from_transformer(copy.deepcopy(pipe.transformer)), base, shift="flux")
    prompts = ["a red cat", "a blue car"]
    for steps, output_type in ((2, "latent"), (3, "pt")):
        kwargs = dict(num_inference_steps=steps, height=RES, width=2 * RES, num_images_per_prompt=2,
                      guidance_scale=4.0, output_type=output_type)
        ours = mf(prompts, generator=[torch.Generator().manual_seed(i) for i in range(4)], **kwargs).images
        theirs = base(prompts, generator=[torch.Generator().manual_seed(i) for i in range(4)],
                      max_sequence_length=T5_LEN, **kwargs).images
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for n in (1, 3):   # one generator per image, as FluxPipeline insists
        with pytest.raises(ValueError, match="generator"):
            mf(prompts, num_inference_steps=1, height=RES, width=RES, output_type="latent",
               generator=[torch.Generator().manual_seed(i) for i in range(n)])


def test_meanflow_pipeline_time_grid_and_dtype(pipe, pipe_dir, tmp_path):
    """The time grid is the one recorded beside the student (the trainer's export records
    sample.shift), "flux" where none is, and can be overridden; ``to(dtype)`` casts the models
    as a diffusers pipeline does."""
    from meanflow.method.sampler import SamplerConfig, time_grid

    student = FluxStudent.from_transformer(copy.deepcopy(pipe.transformer))
    student.save_pretrained(tmp_path / "bare")
    assert MeanFlowFluxPipeline.from_pretrained(tmp_path / "bare", base=pipe_dir).shift == "flux"
    MeanFlowFluxPipeline(student, pipe, base=str(pipe_dir), shift="none").save_pretrained(tmp_path / "none")
    mf = MeanFlowFluxPipeline.from_pretrained(tmp_path / "none")
    assert mf.shift == "none"
    assert MeanFlowFluxPipeline.from_pretrained(tmp_path / "none", shift="flux").shift == "flux"

    times = []
    mf.student.register_forward_pre_hook(lambda module, args: times.append(args[2][0].item()))
    kwargs = dict(num_inference_steps=2, height=RES, width=RES, output_type="latent")
    mf("a red cat", **kwargs)
    assert times == [1.0, 0.5]  # uniform
    times.clear()
    mf("a red cat", shift="flux", **kwargs)
    shifted = time_grid(SamplerConfig(steps=2, shift="flux"), image_seq_len=N_IMG)[1].item()
    assert times == pytest.approx([1.0, shifted]) and abs(shifted - 0.5) > 0.01
    with pytest.raises(ValueError, match="shift"):
        mf("a red cat", shift="karras", **kwargs)

    assert mf.to(torch.bfloat16) is mf
    base = mf.base_pipeline
    modules = (mf.student, base.vae, base.text_encoder, base.text_encoder_2)
    assert all(p.dtype == torch.bfloat16 for m in modules for p in m.parameters())
    z = mf("a red cat", **kwargs).images
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    mf.to("cpu", torch.float32)
    assert mf.dtype == torch.float32 and mf.base_pipeline.vae.dtype == torch.float32
    mf.to(device="cpu", dtype=torch.float32)
    for bad, name in ((torch.int64, "dtype"), (3.0, "device"), ("no-such-device", "device")):
        with pytest.raises(ValueError, match=name):
            mf.to(bad)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

def test_distill_through_the_flux_world(pipe_dir, prompt_file, tmp_path, monkeypatch):
    from meanflow.train.distill import distill

    config = _config(pipe_dir, prompt_file, tmp_path, "model.resolution=16", "data.num_teacher_latents=4", "eval.teacher_steps=[2]",
                     "data.batch_size=2", "sample.per_prompt=1")
    assert distill(config, log=lambda *_: None) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "samples/final.png", "student/meanflow_student.json",
                 "teacher_latents.safetensors"):
        assert (run / name).exists(), name
    with Image.open(run / "samples" / "final.png") as grid:   # rows: sample.steps [1, 2]; 8 eval prompts
        assert grid.size == (8 * 16 + 9 * 2, 2 * 16 + 3 * 2)
    mf = MeanFlowFluxPipeline.from_pretrained(run / "student")   # the base pipeline: recorded by the export
    assert mf.shift == "flux"  # the run's sample.shift, recorded by the export
    out = mf("a red cat", num_inference_steps=2, height=16, width=16, output_type="pt")
    assert out.images.shape == (1, 3, 16, 16) and torch.isfinite(out.images).all()


def test_distill_through_the_flux_world_on_two_ranks(pipe_dir, prompt_file, tmp_path):
    """The FLUX world under torchrun (2 CPU ranks, FSDP2): the image folder is encoded once (by
    rank 0, the other rank reads its cache), and the run repeats the one-process run."""
    from meanflow.cli import main
    from meanflow.testing import assert_same_metrics, distill_args, metrics_rows, student_weight_difference, torchrun

    images = tmp_path / "images"
    _write_images(images)
    overrides = ["model.kind=flux", f"model.teacher={pipe_dir}", f"data.prompts={prompt_file}",
                 "data.source=dataset", f"data.images={images}", "run.eval_at_end=false",
                 "method.guidance.mode=embedded", "method.guidance.scales=[3.5]", "sample.shift=flux",
                 "model.resolution=16", "data.batch_size=2", "sample.per_prompt=1",
                 "model.gradient_checkpointing=true",
                 # Two solver steps: at initialisation the student equals the embedded-guidance
                 # teacher, so a one-step target would leave only rounding noise to train on.
                 "method.target.solver_steps=2"]
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"run-{ranks}"
        args = distill_args(out, *overrides)
        if ranks == 1:
            assert main(args) == 0
        else:
            result = torchrun(2, "-m", "meanflow", *args)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert result.stdout.count("encoding") <= 1  # rank 0 alone encodes and logs
        runs[ranks] = out
        assert (out / DATASET_LATENTS_FILE).is_file()
    assert_same_metrics(metrics_rows(runs[2]), metrics_rows(runs[1]))
    assert student_weight_difference(runs[2], runs[1]) < 2e-4


@pytest.mark.gpu
def test_sharded_distill_on_a_gpu_with_nccl(pipe_dir, prompt_file, tmp_path):
    """The sharded trainer on CUDA: torchrun with one rank per visible GPU (NCCL and the gloo
    side group), bf16 mixed precision, a sharded checkpoint, then a resume from it."""
    from meanflow.testing import distill_args, metrics_rows, torchrun

    gpus = torch.cuda.device_count()
    ranks = 2 if gpus >= 2 else 1
    out = tmp_path / "run"
    overrides = ["model.kind=flux", f"model.teacher={pipe_dir}", f"data.prompts={prompt_file}",
                 "data.source=teacher", "run.device=cuda", "run.dtype=bfloat16", "run.eval_at_end=false",
                 "method.guidance.mode=embedded", "method.guidance.scales=[3.5]", "sample.shift=flux",
                 "model.resolution=16", "data.batch_size=2", "data.num_teacher_latents=4",
                 "eval.teacher_steps=[2]", "sample.per_prompt=1", "model.gradient_checkpointing=true",
                 "method.target.solver_steps=2"]
    first = torchrun(ranks, "-m", "meanflow", *distill_args(out, *overrides, "run.max_steps=2"), timeout=240)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = torchrun(ranks, "-m", "meanflow", *distill_args(out, *overrides, "run.max_steps=4", resume=True),
                     timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["skipped"] == "0" and float(r["loss"]) == float(r["loss"]) for r in rows)
    assert (out / "student" / "meanflow_student.json").is_file()
