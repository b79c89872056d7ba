"""Shared fixtures: tiny random Llama models and an offline tokenizer, one Ray runtime per
test session (private temp dir, capped object store; never `ray stop`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s by default: about 5 s of waiting per
# fine-tune (at start and after the last report), which the tests' many tiny runs add up.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Fault-injection markers (recall_ray.cluster.faults): set before the session's Ray starts,
# so that every worker inherits it; tests/test_faults.py writes markers here.
FAULTS = Path(tempfile.mkdtemp(prefix="rr_faults_"))
os.environ["RECALL_RAY_FAULTS"] = str(FAULTS)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The test S3 server (`s3_store`): its address and made-up credentials are set before the
# session's Ray starts, so that its workers (and every subprocess) reach it too, and so that
# no test can reach a real object store with a developer's credentials.
S3_ENV = {"AWS_ACCESS_KEY_ID": "recall-ray-test", "AWS_SECRET_ACCESS_KEY": "recall-ray-test-secret",
          "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
          "AWS_EC2_METADATA_DISABLED": "true"}  # never ask an instance-metadata service
for _k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_k, None)
os.environ.update(S3_ENV)


def make_tokenizer(out_dir: Path, vocab_size: int = 300) -> None:
    """A small byte-level BPE tokenizer trained offline on the shipped SST-2 text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [json.loads(l)["sentence"] for l in (DATA / "sst2" / "train.jsonl").read_text().splitlines()[:400]]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", bos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)


def make_tiny_llama(out_dir: Path, seed: int = 0, layers: int = 2, hidden: int = 64, tie: bool = True,
                    tokenizer_dir: Path | None = None, dtype: torch.dtype = torch.float32,
                    model_type: str = "llama") -> Path:
    """A random tiny causal LM saved as a Hugging Face directory (safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok_dir = tokenizer_dir or out_dir
    if tokenizer_dir is None:
        make_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.02) -> Path:
    """A 'fine-tuned' copy of src: every floating weight plus small seeded noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def make_lora(base: Path, out: Path, seed: int = 0, scale: float = 0.5, targets=("q_proj", "v_proj"),
              use_rslora: bool = False):
    """A PEFT LoRA adapter of `base` (r 4, alpha 8) with random non-zero B (std `scale`),
    saved to `out`; returns the PeftModel (for `merge_and_unload`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                                          use_rslora=use_rslora))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(out)
    return pm


def load_job(name: str):
    """jobs/<name>.py as a module, so that a test runs its main() in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def float64_state(model_dir: Path) -> dict:
    """Every tensor of a model directory's safetensors shards, as float64 numpy arrays (the
    tests' independent reference)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update({k: v.to(torch.float64).numpy() for k, v in load_file(f).items()})
    return out


def reference_group(name: str, num_layers: int) -> int:
    """The grouping rule of docs/design.md for the tiny Llamas, written independently of
    recall_ray.architectures."""
    import re

    if name == "model.embed_tokens.weight":
        return 0
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    assert name in ("model.norm.weight", "lm_head.weight"), name
    return num_layers


@pytest.fixture(autouse=True)
def _job_logging_goes_with_its_test():
    """A job run in-process (its main()) puts the job's log handlers on the root logger
    (cli.setup_logging); they go with the test, so that a later test's records do not land
    in that job's log, nor in an upload at exit to a test bucket that is gone by then."""
    from recall_ray.cli import remove_job_logging

    yield
    remove_job_logging(upload=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def tiny_experts(tmp_path_factory, tiny_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny_experts")
    return [perturbed_copy(tiny_dir, root / f"e{i}", seed=100 + i) for i in range(2)]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for the whole test session."""
    import ray

    from recall_ray.cluster.runtime import own_dashboard, release_dashboard

    ray_tmp = None
    if not ray.is_initialized():
        ray_tmp = tempfile.mkdtemp(prefix="rr_ray_", dir="/tmp")  # short: Ray's socket paths live under it
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=256 * 1024**2,
            **own_dashboard(),  # its fine-tunes must not ask another Ray instance whether they live
            _temp_dir=ray_tmp,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}},
        )
    yield ray
    ray.shutdown()
    if ray_tmp is not None:
        release_dashboard()
        shutil.rmtree(ray_tmp, ignore_errors=True)


class S3Store:
    """The test S3 server: its bucket and `uri(key)` -> s3://bucket/key."""

    def __init__(self, bucket: str, endpoint: str):
        self.bucket, self.endpoint = bucket, endpoint

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_dir(self, local: Path, key: str) -> str:
        """Upload a local directory's files under `key`; returns its URI."""
        import pyarrow.fs as pafs

        s3, _ = pafs.FileSystem.from_uri(self.uri(key))
        pafs.copy_files(str(local), f"{self.bucket}/{key}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)
        return self.uri(key)


@pytest.fixture(scope="session")
def s3_store(tiny_dir, tiny_experts):
    """An S3-compatible server at S3_ENV's endpoint (moto's server mode, a thread of this
    process; no network beyond localhost) with one bucket holding the tiny models under
    models/base, models/e0 and models/new."""
    from urllib.parse import urlsplit

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=urlsplit(S3_ENV["AWS_ENDPOINT_URL"]).port, verbose=False)
    server.start()
    store = S3Store("recall-ray-test", S3_ENV["AWS_ENDPOINT_URL"])
    boto3.client("s3").create_bucket(Bucket=store.bucket)
    for key, local in {"models/base": tiny_dir, "models/e0": tiny_experts[0], "models/new": tiny_experts[1]}.items():
        store.put_dir(local, key)
    yield store
    server.stop()


def small_finetune_cfg(**kw):
    """The tests' short LoRA fine-tune: 3 steps of 4 records, r 4, alpha 8, lr 1e-2."""
    from recall_ray.config import FinetuneConfig

    base = dict(steps=3, batch_size=4, r=4, alpha=8.0, learning_rate=1e-2, max_length=64, seed=0)
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def sst2_records():
    from recall_ray.core.templates import load_task_records

    return load_task_records(str(DATA / "sst2" / "train.jsonl"), "sst2", max_samples=16)


def ones_fisher(model_dir: Path, path: Path, target_modules=("q_proj", "v_proj")) -> str:
    """An EWC Fisher of ones for every LoRA-targeted weight of `model_dir`."""
    from safetensors import safe_open

    from recall_ray.core.ewc import target_weight_names
    from recall_ray.io.safetensors_io import save_fisher

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        names = target_weight_names(list(f.keys()), list(target_modules))
        return save_fisher({n: torch.ones(f.get_slice(n).get_shape()) for n in names}, str(path))


@pytest.fixture(scope="session")
def two_runs(ray_session, tiny_dir, sst2_records, tmp_path_factory):
    """Two short fine-tunes (`small_finetune_cfg`, same seed) of the tiny model on SST-2, the
    second with an EWC Fisher of ones at lambda 0: identical adapters show both that a seed
    fixes the run and that a zero-weight penalty changes nothing (test_finetune, test_ewc).
    Returns (root, [plain, lambda 0], the Fisher's path)."""
    from recall_ray.cluster.finetune import finetune_lora

    root = tmp_path_factory.mktemp("ft")
    ones = ones_fisher(tiny_dir, root / "ones.safetensors")
    outs = [finetune_lora(str(tiny_dir), sst2_records, small_finetune_cfg(), str(root / f"a{i}"), str(root / "ray"),
                          task="sst2", **({"ewc_fisher": ones, "ewc_lambda": 0.0} if i else {})) for i in range(2)]
    return root, outs, ones


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dir, tiny_experts, ray_session):
    """One finished RECALL job on the tiny models (base, expert e0, new model), with the
    evaluation stage (a uniform-average baseline, scored beside the merge and the new
    model): shared by the pipeline, evaluation and notebook tests."""
    from recall_ray.config import build_config
    from recall_ray.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    cfg = build_config(tiny_run_tree(str(root / "run"), str(tiny_dir), str(tiny_experts[0]), str(tiny_experts[1])))
    result = run_pipeline(cfg)
    # as the run in a new directory left it (tests rerun the job in the same directory)
    shutil.copy(root / "run" / "manifest.json", root / "first_manifest.json")
    return cfg, result


def tiny_run_tree(run_dir: str, base: str, e0: str, new: str) -> dict:
    """`tiny_run`'s config, its models and run directory given (paths or URIs): the
    object-storage test runs the same job from a bucket."""
    return {
        "run_dir": run_dir,
        "base": {"name": "base", "path": base},
        "experts": [{"name": "e0", "path": e0}],
        "new_model": {"name": "new", "path": new},
        "task": {"name": "sst2", "data": str(DATA / "sst2" / "train.jsonl"), "template": "sst2", "max_samples": 40},
        "typical": {"k": 4},
        "similarity": {"sigma": "median"},
        "representations": {"batch_size": 8},
        "evaluate": {"tasks": ["sst2", "ag_news"], "max_samples": 5, "data_dir": str(DATA), "batch_size": 4},
    }
