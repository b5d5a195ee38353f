"""A small real model for vLLM's CPU build, made on this machine with no model hub.

A two-layer Qwen3-shaped decoder with random weights (``transformers``), a
byte-level BPE tokenizer trained with ``tokenizers`` on text the machine has
(the Zen of Python, and sentences of the filler words ``concur swarm`` writes,
so each filler word is one token), and a ChatML chat template. Its outputs are
noise, but vLLM serves it like any model: the same scheduler, the same paged
KV cache with 128-token blocks on the CPU backend, the same prefix caching,
the same metrics, the same OpenAI server. On two cores it prefills about 11k
tokens/s cold (a 26k-token prompt in ~2.5 s, attention is quadratic) and
decodes one stream at ~1.5 ms per token: recomputing a context costs here what
it costs on a GPU, relative to decoding.

Deterministic: the same recipe and library versions give the same files. The
model is made once per recipe and kept under :func:`cache_root`
(``$CONCUR_CACHE_DIR`` or ``~/.cache/concur``); :func:`ensure_model` returns it.
Needs torch, transformers and tokenizers (the vLLM venv has them): run it there,
``python -m concur.sim.realvllm.model`` prints the directory.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["RECIPE", "ModelRecipe", "cache_root", "ensure_model", "model_key"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ModelRecipe:
    """Everything that decides the model's files."""

    version: int = 1
    """Bump when the recipe's code changes what it writes."""
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 131072
    vocab_target: int = 2048
    """BPE merges stop here or when the corpus has no pair left (fewer, in practice)."""
    corpus_sentences: int = 500
    seed: int = 0
    dtype: str = "bfloat16"

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer, in ``dtype`` (2 bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


RECIPE = ModelRecipe()


def cache_root() -> Path:
    """Where made models are kept: ``$CONCUR_CACHE_DIR`` or ``~/.cache/concur``."""
    env = os.environ.get("CONCUR_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "concur"


def model_key(recipe: ModelRecipe = RECIPE) -> str:
    """A short hash of the recipe and of the library versions that write the files."""
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for lib in ("torch", "transformers", "tokenizers"):
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            libs[lib] = "missing"
    blob = json.dumps({"recipe": asdict(recipe), "libs": libs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _corpus(recipe: ModelRecipe) -> list[str]:
    from concur.sim.server.tokenizer import filler_text

    with contextlib.redirect_stdout(io.StringIO()):  # importing it prints the Zen
        import this  # noqa: F401
    zen = codecs.decode(sys.modules["this"].s, "rot13")  # kept rot13-encoded in this.s
    rng = random.Random(recipe.seed)
    filler = [filler_text(200, rng.randrange(2**32)) for _ in range(recipe.corpus_sentences)]
    return [zen] * 20 + filler


def _write(out: Path, recipe: ModelRecipe) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_target,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(recipe), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        torch_dtype=recipe.dtype,
    )
    torch.manual_seed(recipe.seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, recipe.dtype))
    model.save_pretrained(out)


def ensure_model(root: Path | None = None, recipe: ModelRecipe = RECIPE) -> Path:
    """The model's directory, made first if this recipe has not been made under ``root``.

    Written to a temporary directory and renamed into place, so an interrupted run
    never leaves a half-made model behind for the next one.
    """
    base = (root or cache_root()) / "models"
    target = base / f"tiny-qwen3-{model_key(recipe)}"
    if (target / "config.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".making-", dir=base))
    try:
        _write(tmp, recipe)
        try:
            tmp.rename(target)
        except OSError:  # another process made it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_model())
