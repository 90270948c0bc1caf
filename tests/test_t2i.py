"""train_t2i.py on tiny random models (tests/tiny_t2i.py), CPU only, no network.

The multi-process tests launch the script as users do, `python -m torch.distributed.run --standalone
--nproc_per_node=2 train_t2i.py ...` (gloo), each under a timeout that kills the whole process group,
so a broken run fails the test instead of hanging it. Faults come from outside, as in real runs: the
test kills or stops a rank's process. tests/ddp_probe.py runs the script with a weight checksum after
every optimiser step, to show that DDP keeps the replicas identical. The rest import the script.
"""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("webdataset")

import tiny_t2i  # noqa: E402  (pytest puts tests/ on sys.path)
import t2i_training  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_t2i.py")
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_probe.py")
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NO_SKIPS = dict.fromkeys(t2i_training.SKIP_REASONS, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline):
    """Tiny pipeline, an imagefolder (10 good + 1 corrupt + 1 uncaptioned), two shards, a tiny CLIP; the
    pipeline and the imagefolder are the session's (conftest.py), linked."""
    root = tmp_path_factory.mktemp("t2i")
    (root / "pipeline").symlink_to(tiny_pipeline("delta"), target_is_directory=True)
    (root / "images").symlink_to(tiny_pipeline("images"), target_is_directory=True)
    os.makedirs(root / "shards")
    tiny_t2i.write_webdataset_tar(str(root / "shards" / "shard-000000.tar"), seed=1, start=0)
    tiny_t2i.write_webdataset_tar(str(root / "shards" / "shard-000001.tar"), seed=2, start=100)
    tiny_t2i.write_tiny_clip(str(root / "clip"))
    return root


def tiny_args(tiny, out_dir, data=None, **flags):
    """Command-line flags for a fast run on the tiny models; flags given as keyword arguments."""
    options = {"pretrained": tiny / "pipeline", "data": data or tiny / "images", "out_dir": out_dir, "resolution": 64,
               "max_text_length": 16, "batch_size": 2, "lr": 1e-4, "log_every": 1, "num_workers": 0,
               "lpips_weight": 0, "dist_timeout": 60, **flags}
    args = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def start(args, nproc, script=SCRIPT, env=None):
    """Start the script (under torchrun when nproc > 1) in a session of its own, output on a pipe."""
    command = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENVIRONMENT, **(env or {})}, start_new_session=True)


def launch(args, nproc=1, timeout=180, script=SCRIPT, env=None):
    """Run the script to its end: (exit status, output); kill torchrun's process group on timeout."""
    process = start(args, nproc, script, env)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"run did not finish within {timeout}s:\n{output[-4000:]}")
    return process.returncode, output


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_rows(rows):
    return [row for row in rows if "event" not in row]


def events(rows, name):
    return [row for row in rows if row.get("event") == name]


# ----------------------------------------------------------------------------------------------
# torchrun, 2 ranks on CPU


def checksums(out_dir):
    """{rank: [(optimiser, sha256 of its parameters) after each step]} as tests/ddp_probe.py wrote them."""
    sums = {}
    for rank in (0, 1):
        with open(os.path.join(out_dir, f"rank{rank}.sha")) as f:
            sums[rank] = [tuple(line.split()) for line in f]
    return sums


@pytest.fixture(scope="module")
def ddp_run(tiny, tmp_path_factory):
    """3 steps on 2 ranks, gradient accumulation 2, a DataLoader worker per rank, LPIPS and the GAN."""
    out_dir = tmp_path_factory.mktemp("ddp")
    args = tiny_args(tiny, out_dir, max_steps=3, grad_accum=2, num_workers=1, lpips_weight=1,
                     lpips_random_backbone=True, gan_weight=0.1, gan_start_step=1, disc_channels=8)
    returncode, output = launch(args, nproc=2, script=PROBE)
    assert returncode == 0, output[-4000:]
    return out_dir, args, read_log(out_dir)


def test_two_ranks_train_with_finite_losses_and_count_each_bad_sample_once(ddp_run):
    _, _, rows = ddp_run
    assert rows[0]["event"] == "config" and rows[0]["world_size"] == 2
    steps = step_rows(rows)
    assert [row["step"] for row in steps] == [1, 2, 3]
    for row in steps:
        assert all(math.isfinite(row[name]) for name in ("loss", "l2", "lpips", "grad_norm")), row
    for row in steps[1:]:  # the GAN starts at step 1: generator and discriminator terms from then on
        assert math.isfinite(row["gan"]) and math.isfinite(row["disc"]), row
    # 1 corrupt image + 1 missing caption, summed over both ranks; each counted once in 2 epochs
    assert steps[-1]["skipped"] == {**NO_SKIPS, "corrupt_image": 1, "missing_caption": 1}


def test_two_ranks_hold_identical_weights_after_every_step_and_write_a_checkpoint(ddp_run):
    out_dir, _, rows = ddp_run
    sums = checksums(out_dir)
    assert sums[0] == sums[1]  # both optimisers' parameters, bit for bit, after every step
    for optimiser, steps in (("0", 2), ("1", 3)):  # the discriminator's (from step 1 on), the denoiser's
        hashes = [digest for index, digest in sums[0] if index == optimiser]
        assert len(hashes) == len(set(hashes)) == steps  # and they trained: every step changed them
    (saved,) = events(rows, "checkpoint")
    assert saved["step"] == 3
    checkpoint = t2i_training.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert checkpoint["step"] == 3 and checkpoint["world_size"] == 2 and len(checkpoint["data"]) == 2
    assert len(checkpoint["rng"]) == 2 and checkpoint["discriminator"] is not None
    assert os.path.isfile(os.path.join(out_dir, "samples", "step_0000003.png"))
    assert os.path.isfile(os.path.join(out_dir, "transformer_ema", "config.json"))


@pytest.mark.slow  # a torchrun launch of its own
def test_two_ranks_train_base_feature_heads_while_the_frozen_base_stays_bit_identical(tiny, tmp_path):
    """--disc-kind basefeat under 2-rank DDP: heads on the frozen base's PixArt blocks, on latents."""
    args = tiny_args(tiny, tmp_path, max_steps=2, gan_weight=0.1, gan_adaptive=False, disc_kind="basefeat",
                     disc_steps=2)
    returncode, output = launch(args, nproc=2, script=PROBE)
    assert returncode == 0, output[-4000:]
    sums = checksums(tmp_path)
    assert sums[0] == sums[1]  # denoiser and heads, bit for bit, after every step
    assert [index for index, _ in sums[0]] == ["1", "0", "0"] * 2  # the denoiser (1), then 2 critic updates (0)
    bases = {rank: (tmp_path / f"rank{rank}.base.sha").read_text().split() for rank in (0, 1)}
    assert len(bases[0]) == 2 and len(set(bases[0] + bases[1])) == 1  # frozen: the same after each step, on each rank
    steps = step_rows(read_log(tmp_path))
    assert [row["step"] for row in steps] == [1, 2] and all(math.isfinite(row["disc"]) for row in steps)
    checkpoint = t2i_training.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert checkpoint["discriminator"] and all(key.startswith("heads.") for key in checkpoint["discriminator"])


@pytest.mark.slow  # a second torchrun launch (~25 s)
def test_two_ranks_resume_from_the_checkpoint_and_continue(ddp_run):
    out_dir, args, rows_before = ddp_run
    sums_before = checksums(out_dir)
    returncode, output = launch(args + ["--resume", "--max-steps", "5"], nproc=2, script=PROBE)
    assert returncode == 0, output[-4000:]
    new_rows = read_log(out_dir)[len(rows_before):]
    (resumed,) = events(new_rows, "resume")
    assert resumed["step"] == 3 and resumed["exact_data_position"] and resumed["changed_config"] == {
        "max_steps": [3, 5]}
    steps = step_rows(new_rows)
    assert [row["step"] for row in steps] == [4, 5] and all(math.isfinite(row["loss"]) for row in steps)
    assert steps[-1]["skipped"] == {**NO_SKIPS, "corrupt_image": 1, "missing_caption": 1}  # not counted again
    (saved,) = events(new_rows, "checkpoint")
    assert saved["step"] == 5
    sums = checksums(out_dir)
    assert sums[0] == sums[1] and len(sums[0]) == len(sums_before[0]) + 4  # 2 more steps, 2 optimisers


@pytest.fixture(scope="module")
def short_run(tiny, tmp_path_factory):
    """2 steps in this process: a finished run, with its ckpt.pt and transformer_ema/."""
    out_dir = tmp_path_factory.mktemp("short")
    args = tiny_args(tiny, out_dir, max_steps=2)
    t2i_training.main(args)
    return out_dir, args


def test_exported_ema_is_the_checkpoints_ema_and_samples_in_the_pipeline_as_the_script_does(tiny, short_run):
    """What a user opens in diffusers is what trained: transformer_ema/ loads with from_pretrained, holds the EMA
    of ckpt.pt to the last bit, and PixArtAlphaPipeline, given the same prompts' embeddings and seed, samples the
    latents of the script's own sample grid at that step (z_T and the LCM's noise: the generator's, in order)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from safetensors.torch import load_file
    out_dir, args = short_run
    checkpoint = t2i_training.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    exported = PixArtTransformer2DModel.from_pretrained(os.path.join(out_dir, "transformer_ema"))
    ema = {name.removeprefix("transformer."): value for name, value in checkpoint["ema"]["module"].items()}
    assert exported.state_dict().keys() == ema.keys()
    assert all(torch.equal(value, ema[name]) for name, value in exported.state_dict().items())
    pretrained = load_file(tiny / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(ema["proj_out.weight"], pretrained["proj_out.weight"])  # the EMA moved: it trained

    config = t2i_training.parse_config(t2i_training.Config, args)
    run = t2i_training.Run(config, t2i_training.Dist(), t2i_training.Log("unused", master=False))
    run.ema.load_state_dict(checkpoint["ema"])
    latents = t2i_training.sample_latents(run, run.sample_cond, torch.Generator().manual_seed(config.seed))
    pipeline = PixArtAlphaPipeline.from_pretrained(str(tiny / "pipeline"), transformer=exported)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(prompt_embeds=run.sample_cond[0], prompt_attention_mask=run.sample_cond[1],
                        guidance_scale=1.0, num_inference_steps=config.e2e.num_steps, height=config.resolution,
                        width=config.resolution, generator=torch.Generator().manual_seed(config.seed),
                        output_type="latent", use_resolution_binning=False).images
    assert float((latents - expected).norm() / expected.norm()) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_ranks_take_the_single_process_step_on_the_same_global_batch(tiny, tmp_path, accumulation):
    """DDP is right iff 2 ranks end where 1 process does on the same global batches from the same z_T: the process
    trains on the ranks' shares in turn (tests/ddp_probe.py's fixed batches, --grad-accum twice the ranks'), so
    every forward pass is the same and only the gradients' sums differ in order. The DDIM update (eta 0) draws no
    noise of its own, and the GAN weight is fixed: the adaptive weight is each rank's own (see --gan-adaptive).
    LPIPS is off: its random test backbone is drawn from each rank's seed (the real one is read from a file).
    Learning rates 1e-5: an attention key bias has no gradient (softmax ignores a shift shared by all keys), so
    AdamW moves it by its rounding noise, up to ~0.1 lr, differently in every run. AdamW and the clip ignore the
    gradient's scale: the logged gradient norm (before the clip) shows that the ranks' mean is the global batch's."""
    per_rank = 2 // accumulation  # a global batch of 4 images per step either way
    flags = dict(max_steps=2, num_steps=2, update="ddim", gan_weight=0.1, disc_channels=8, lr=1e-5, disc_lr=1e-5)
    fixed = {"E2EDIFF_FIXED_BATCHES": "2"}  # each global micro-batch in 2 shares
    for name, nproc, accumulate in (("ranks", 2, accumulation), ("one", 1, 2 * accumulation)):
        args = tiny_args(tiny, tmp_path / name, batch_size=per_rank, grad_accum=accumulate, **flags)
        returncode, output = launch(args + ["--no-gan-adaptive"], nproc=nproc, script=PROBE, env=fixed)
        assert returncode == 0, output[-4000:]
    ranks = t2i_training.load_checkpoint(tmp_path / "ranks" / "ckpt.pt")
    one = t2i_training.load_checkpoint(tmp_path / "one" / "ckpt.pt")
    assert ranks["step"] == one["step"] == 2 and (ranks["world_size"], one["world_size"]) == (2, 1)
    from safetensors.torch import load_file
    pretrained = load_file(tiny / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    moved = max(float((one["model"][name] - value).abs().max()) for name, value in pretrained.items())
    assert moved > 1e-5  # it trained: two AdamW steps at lr 1e-5
    for part in ("model", "ema", "discriminator"):
        ours, theirs = (run[part]["module"] if part == "ema" else run[part] for run in (one, ranks))
        for name, value in ours.items():
            assert float((value - theirs[name]).abs().max()) <= 1e-6, (part, name)
    for name in ("loss", "gan", "disc", "grad_norm"):  # the ranks' means are the global batch's
        logged = [[row[name] for row in step_rows(read_log(tmp_path / run))] for run in ("ranks", "one")]
        assert logged[0] == pytest.approx(logged[1], rel=1e-5), name

def rank_process(torchrun_pid, rank):
    """The pid of torchrun's child with RANK=<rank> in its environment (its DataLoader workers, the
    grandchildren, have it too), or None."""
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/environ", "rb") as f:
                environment = f.read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if parent == torchrun_pid and f"RANK={rank}".encode() in environment:
            return int(name)
    return None


@pytest.mark.slow  # a long fault injection: the hung rank is found by --dist-timeout
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dead_rank", "hung_rank"])
def test_a_dead_or_hung_rank_fails_the_run_instead_of_hanging_it(tiny, tmp_path, fault):
    # once training is under way rank 1 is killed, or stopped; rank 0 must give up after --dist-timeout
    args = tiny_args(tiny, tmp_path, max_steps=200, dist_timeout=20)
    process, victim, lines = start(args, nproc=2), None, []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step 1 |"):
                victim = rank_process(process.pid, 1)
                assert victim is not None, "no child of torchrun with RANK=1"
                os.kill(victim, fault)
                faulted = time.time()
                break
        output = "".join(lines) + process.communicate(timeout=150)[0]
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not end within 150 s of the fault:\n" + "".join(lines)[-4000:])
    finally:
        for group in (process.pid, victim):  # torchrun's session, and the rank's own (a stopped rank stays)
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
    assert victim is not None and process.returncode != 0, output[-4000:]
    # the 20 s of --dist-timeout, then up to 30 s for torchrun to SIGKILL a rank that ignores its SIGTERM
    assert time.time() - faulted < 90, output[-4000:]
    trained = [row["step"] for row in step_rows(read_log(tmp_path))]
    assert trained[0] == 1 and trained[-1] < 200  # it trained, then the fault ended it


@pytest.mark.slow  # a fault injection through torchrun, then a resume (two launches)
def test_ctrl_c_on_torchrun_checkpoints_every_rank_at_one_step_and_resume_continues(tiny, tmp_path):
    """Ctrl-C reaches torchrun, which forwards SIGINT to each rank's process group (rank + DataLoader
    worker): every rank must finish its step, agree on it, checkpoint it and exit; --resume goes on."""
    args = tiny_args(tiny, tmp_path, max_steps=200, num_workers=1, dist_timeout=60)
    process, lines = start(args, nproc=2), []
    try:
        for line in process.stdout:  # wait until training is under way, then press "Ctrl-C"
            lines.append(line)
            if line.startswith("step 2 |"):
                process.send_signal(signal.SIGINT)
                break
        output = "".join(lines) + process.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 120 s of Ctrl-C:\n" + "".join(lines)[-4000:])
    assert process.returncode != 0 and "Continue with the same command plus --resume" in output, output[-4000:]
    rows = read_log(tmp_path)
    (stopped,) = events(rows, "stopped")
    stop_step = stopped["step"]
    assert 2 <= stop_step < 200
    assert [row["step"] for row in step_rows(rows)] == list(range(1, stop_step + 1))
    assert events(rows, "checkpoint")[-1]["step"] == stop_step
    assert t2i_training.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["step"] == stop_step

    returncode, output = launch(args + ["--resume", "--max-steps", str(stop_step + 2)], nproc=2)
    assert returncode == 0, output[-4000:]
    new_rows = read_log(tmp_path)[len(rows):]
    (resumed,) = events(new_rows, "resume")
    assert resumed["step"] == stop_step and resumed["exact_data_position"]
    assert [row["step"] for row in step_rows(new_rows)] == [stop_step + 1, stop_step + 2]


# ----------------------------------------------------------------------------------------------
# one process


def test_single_process_reads_webdataset_shards_and_scores_clip(tiny, tmp_path):
    data = str(tiny / "shards" / "shard-{000000..000001}.tar")
    args = tiny_args(tiny, tmp_path, data=data, max_steps=3, eval_data=tiny / "images", clip_model=tiny / "clip")
    returncode, output = launch(args, env={"TORCH_HOME": str(tmp_path / "torch-home")})  # no Inception weights there
    assert returncode == 0, output[-4000:]
    rows = read_log(tmp_path)
    (start,) = events(rows, "start")
    assert start["data"] == "webdataset" and start["units"] == 2
    assert (start["spacing"], start["timesteps"]) == ("lcm", [999, 759, 499, 259])  # the LCM base's own grid
    steps = step_rows(rows)
    assert [row["step"] for row in steps] == [1, 2, 3] and all(math.isfinite(row["loss"]) for row in steps)
    assert steps[-1]["skipped"] == {**NO_SKIPS, "empty_caption": 1}  # 6 samples read: one shard's sample 2 is empty
    (evaluation,) = events(rows, "eval")
    assert math.isfinite(evaluation["clip_score"])
    assert "fid" not in evaluation and "FID skipped" in evaluation["messages"][0]
    assert "--inception-weights" in evaluation["messages"][0]


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    """The imagefolder pre-computed to VAE posteriors + T5 embeddings (in this process)."""
    folder = tmp_path_factory.mktemp("cache")
    t2i_training.main(tiny_args(tiny, folder / "unused", precompute_to=folder))
    return folder


def test_precompute_writes_one_file_per_usable_sample(cache):
    with open(cache / "meta.json") as f:
        meta = json.load(f)
    assert meta["samples"] == 10 and meta["skipped"] == {**NO_SKIPS, "corrupt_image": 1, "missing_caption": 1}
    from safetensors.torch import load_file
    files = sorted(p for p in os.listdir(cache) if p.endswith(".safetensors"))
    assert len(files) == 10
    tensors = load_file(os.path.join(cache, files[0]))
    assert tensors["latent_mean"].shape == tensors["latent_std"].shape == (4, 8, 8)
    assert tensors["text_embeddings"].shape == (16, 32) and tensors["attention_mask"].shape == (16,)


def assert_equal(a, b, where):
    """a == b, tensors to the last bit, through nested dicts and lists."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{index}]")
    else:
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, where


def test_resume_is_exact_on_precomputed_data(tiny, cache, tmp_path):
    # 4 uninterrupted steps == 2 steps, stop, resume, 2 more: same weights, EMA, optimisers, to the last bit
    flags = dict(data=cache, coupling="inversion", inversion_steps=4, checkpoint_blocks=True, backprop_steps=2,
                 gan_weight=0.1, gan_start_step=1, disc_channels=8)
    t2i_training.main(tiny_args(tiny, tmp_path / "straight", max_steps=4, **flags))
    t2i_training.main(tiny_args(tiny, tmp_path / "resumed", max_steps=2, **flags))
    t2i_training.main(tiny_args(tiny, tmp_path / "resumed", max_steps=4, resume=True, **flags))
    straight = t2i_training.load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    resumed = t2i_training.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert straight["step"] == resumed["step"] == 4 and straight["discriminator"] is not None
    for part in ("model", "ema", "optimizer", "discriminator", "disc_optimizer"):
        assert_equal(straight[part], resumed[part], part)
    from safetensors.torch import load_file
    pretrained = load_file(tiny / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(straight["model"]["proj_out.weight"], pretrained["proj_out.weight"])  # it trained
    assert [row["step"] for row in step_rows(read_log(tmp_path / "resumed"))] == [1, 2, 3, 4]


def test_teacher_coupling_with_the_gan_shows_the_discriminator_decoded_images(tiny, cache, tmp_path):
    # the teacher's target is a latent: the discriminator must see it decoded (64 px), not as 8x8 latents
    t2i_training.main(tiny_args(tiny, tmp_path, data=cache, max_steps=2, coupling="teacher", teacher_steps=2,
                             gan_weight=0.1, disc_channels=8))
    steps = step_rows(read_log(tmp_path))
    assert [row["step"] for row in steps] == [1, 2]
    assert all(math.isfinite(row[name]) for row in steps for name in ("loss", "gan", "disc")), steps


def test_a_gan_run_logs_its_critics_auc_and_records_it_after_the_warm_up_and_at_the_end(tiny, cache, tmp_path):
    t2i_training.main(tiny_args(tiny, tmp_path, data=cache, max_steps=3, log_every=1, gan_weight=0.1,
                                gan_adaptive=False, critic_warmup_steps=2, disc_steps=2, disc_channels=8))
    rows = read_log(tmp_path)
    steps = step_rows(rows)
    assert [row["step"] for row in steps] == [1, 2, 3] and "loss" not in steps[0] and "loss" in steps[2]
    assert all(0.0 <= row["critic_auc"] <= 1.0 for row in steps), steps
    (done,) = events(rows, "done")
    assert (done["critic_auc_warmup"], done["critic_auc"]) == (steps[1]["critic_auc"], steps[2]["critic_auc"])
    checkpoint = t2i_training.load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint["critic_auc"] == {"warmup": steps[1]["critic_auc"], "final": steps[2]["critic_auc"]}


# ----------------------------------------------------------------------------------------------
# pieces


def test_data_streams_split_units_across_readers_and_resume_mid_stream(tiny, tmp_path):
    streams = [t2i_training.CaptionStream(str(tiny / "images"), 64, rank, 2, epochs=1) for rank in (0, 1)]
    items = [list(stream) for stream in streams]
    keys = [{item["key"] for item in rank_items if "key" in item} for rank_items in items]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 10  # disjoint, and together all good samples
    bad = {**items[0][-1]["state"]["bad"], **items[1][-1]["state"]["bad"]}  # a finite stream ends with its state
    assert bad == {"corrupt.jpg": "corrupt_image", "nocaption.jpg": "missing_caption"}
    with open(tiny / "shards" / "shard-000001.tar", "rb") as f:
        (tmp_path / "truncated.tar").write_bytes(f.read(5000))  # one image, then the end of the data
    (tmp_path / "good.tar").write_bytes((tiny / "shards" / "shard-000000.tar").read_bytes())
    *samples, end = t2i_training.CaptionStream(str(tmp_path), 64, epochs=1)
    assert len(samples) == 8  # the good shard's; the truncated one's only image lost its caption
    assert Counter(end["state"]["bad"].values()) == {"corrupt_shard": 1, "missing_caption": 1, "empty_caption": 1}
    shards = str(tiny / "shards" / "shard-{000000..000001}.tar")
    for data in (str(tiny / "images"), shards):
        stream = iter(t2i_training.CaptionStream(data, 64, seed=3))
        straight = [next(stream) for _ in range(14)]  # crosses a shard / an epoch boundary
        resumed = iter(t2i_training.CaptionStream(data, 64, seed=3, start={0: straight[5]["state"]}))
        assert [next(resumed)["key"] for _ in range(8)] == [item["key"] for item in straight[6:]]
        assert torch.equal(next(iter(t2i_training.CaptionStream(data, 64, seed=3)))["pixels"], straight[0]["pixels"])
    pixels = straight[0]["pixels"]  # resized and centre-cropped from 80x72, in [-1, 1]
    assert pixels.shape == (3, 64, 64) and -1 <= pixels.min() <= pixels.max() <= 1


def test_flags_set_the_script_and_the_method_config():
    config = t2i_training.parse_config(t2i_training.Config, ["--data", "d", "--lr", "1e-5", "--coupling", "inversion",
                                                       "--no-grad-checkpoint", "--backprop-steps", "2"])
    assert config.lr == 1e-5 and config.data == "d"
    assert (config.e2e.coupling, config.e2e.grad_checkpoint, config.e2e.backprop_steps) == ("inversion", False, 2)
    assert config.e2e.ema_decay == 0.95 and config.e2e.lpips_weight == 1.0  # the paper's recipe otherwise
    with pytest.raises(t2i_training.UsageError):  # the old name of --grad-checkpoint is gone
        t2i_training.parse_config(t2i_training.Config, ["--data", "d", "--checkpoint-steps"])


def test_auto_spacing_keeps_an_lcm_base_on_its_distillation_grid(tiny):
    config = t2i_training.Config(pretrained=str(tiny / "pipeline"), data="unused")
    assert config.e2e.spacing == "auto"
    method = t2i_training.base_grid(config.e2e, t2i_training.load_scheduler_config(config))  # an LCMScheduler
    assert (method.spacing, method.original_steps) == ("lcm", 50)
    assert t2i_training.base_grid(config.e2e, {"_class_name": "LCMScheduler", "original_inference_steps": 25}
                               ).original_steps == 25
    assert t2i_training.base_grid(config.e2e, {"_class_name": "DDIMScheduler"}).spacing == "trailing"
    given = dataclasses.replace(config.e2e, spacing="leading")
    assert t2i_training.base_grid(given, {"_class_name": "LCMScheduler"}) is given  # a --spacing given is kept


def test_schedule_and_prediction_type_come_from_the_scheduler_config(tiny):
    from diffusers import LCMScheduler
    config = t2i_training.Config(pretrained=str(tiny / "pipeline"), data="unused")
    scheduler_config = t2i_training.load_scheduler_config(config)
    schedule = t2i_training.schedule_from_config(scheduler_config)
    reference = LCMScheduler.from_pretrained(str(tiny / "pipeline"), subfolder="scheduler").alphas_cumprod
    assert torch.allclose(schedule.alphas_cumprod, reference, rtol=1e-5, atol=1e-7)
    assert scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="epsilon"):  # PixArt-delta's epsilon rules out zero terminal SNR
        zero_snr = t2i_training.schedule_from_config(scheduler_config, zero_terminal_snr=True)
        t2i_training.check_prediction_type("epsilon", zero_snr)


@pytest.mark.parametrize("micro_conditions", [False, True])
def test_denoiser_adapter_keeps_the_mean_half_of_a_learned_variance(micro_conditions):
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=micro_conditions)  # True: the 1024-MS models' resolution + aspect-ratio input
    denoiser = t2i_training.DiffusersDenoiser(transformer)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 500])
    cond = (torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    output = denoiser(z, t, cond)
    assert output.shape == z.shape
    assert denoiser.last_layer is transformer.proj_out.weight
    if not micro_conditions:
        full = transformer(z, timestep=t, encoder_hidden_states=cond[0], encoder_attention_mask=cond[1],
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert torch.equal(output, full[:, :4])


def test_missing_model_fails_with_the_download_command(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # HF_HUB_OFFLINE (conftest): found out before any loading
        t2i_training.main(tiny_args(tiny, tmp_path / "run", pretrained="nobody/no-such-model"))
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    assert "hf download nobody/no-such-model --local-dir models/no-such-model" in capsys.readouterr().err
    with pytest.raises(t2i_training.MissingModelError, match="hf download nobody/no-such-model --local-dir"):
        t2i_training.load_vae(t2i_training.Config(pretrained="nobody/no-such-model", data="unused"), torch.device("cpu"))
    with pytest.raises(t2i_training.MissingModelError, match="pipeline folder"):
        t2i_training.load_vae(t2i_training.Config(pretrained=str(tmp_path), data="unused"), torch.device("cpu"))


def test_evaluation_reports_missing_models_clearly(tmp_path):
    config = t2i_training.Config(data="unused", clip_model=str(tmp_path / "no-clip"),
                              inception_weights=str(tmp_path / "no.pth"))
    metrics, messages = t2i_training.build_metrics(config, torch.device("cpu"))
    assert metrics == {}
    assert "CLIP score skipped" in messages[0] and "--clip-model" in messages[0]
    assert "FID skipped" in messages[1] and str(tmp_path / "no.pth") in messages[1]
