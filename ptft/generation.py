"""Generating text with a trained language model, and labelling text with a trained classifier
(ptft generate)."""

from __future__ import annotations

import torch

from ptft.errors import UsageError
from ptft.inference import inference_device


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt as a (1, n) tensor of token ids, rendered as in training."""
    if chat:
        from ptft.data.sft import ensure_chat_template

        ensure_chat_template(tokenizer)  # the template ptft trains with when a model has none
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        # The rendered template carries its own special tokens (SFT tokenises it the same way).
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        # Pre-training ends every document with EOS, so after it the model starts a new one.
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None
               else tokenizer.eos_token_id]
    return torch.tensor([ids], dtype=torch.long)


def generate(model, tokenizer, prompt: str, *, chat: bool, max_new_tokens: int,
             temperature: float, top_p: float, seed: int) -> str:
    """The model's continuation of `prompt` (the new text only). temperature 0 is greedy."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1].")
    device = inference_device()
    model.to(device)
    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    limit = _max_positions(model)
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise UsageError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens "
                         f"{max_new_tokens} exceeds the model's {limit} positions.")
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample,
        # top_k=0: only the sampling controls this command offers (transformers adds top-k 50).
        **(dict(temperature=temperature, top_p=top_p, top_k=0) if sample else {}),
        eos_token_id=_stop_tokens(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)  # the same seed gives the same sample
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _stop_tokens(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config names (chat models often
    end a turn with a token of their own)."""
    stops = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in (extra if isinstance(extra, list) else [extra]):
        if token is not None and token not in stops:
            stops.append(token)
    return stops


def _max_positions(model) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def classify(model, tokenizer, text: str) -> list[tuple[str, float]]:
    """(label, probability) for every label, most likely first."""
    device = inference_device()
    model.to(device)
    ids = tokenizer(text)["input_ids"]  # as classification examples are tokenised in training
    limit = _max_positions(model)
    ids = torch.tensor([ids[:limit] if limit else ids], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    probs = logits.float().softmax(-1)[0]
    id2label = model.config.id2label
    return sorted(((id2label[i], float(p)) for i, p in enumerate(probs.tolist())),
                  key=lambda pair: -pair[1])
