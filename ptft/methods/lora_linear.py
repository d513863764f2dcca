"""peft's LoRA linear layer, computed the cheaper way for each kind of call.

* Training (gradients on, one plain LoRA adapter over an nn.Linear): one matmul over the
  merged weight W + s B A, forward and backward (ptft/methods/lora_merged_weight.py).
* Everything else that is plain LoRA (evaluation, generation, dropout, several adapters):
  peft's sum with the update added into the base output in place. peft computes
  `result = result + lora_B(lora_A(x)) * scaling`: per adapted projection that is two more
  (tokens x out) tensors (the scaled update and the sum) on top of lora_B's output. On
  llama-small (seq 512 x batch 8, fp32, CPU) those short-lived blocks fragmented the heap so
  much that LoRA's peak RSS ended above full fine-tuning's (2.9 vs 2.7 GB).
  `result.add_(lora_B(lora_A(x)), alpha=scaling)` is the same sum (one rounding instead of
  two) with neither temporary. In place is safe: the base layer is an nn.Linear, whose
  backward reads its input and weight, never its output.
* What is not plain LoRA (merged or disabled adapters, per-sample adapter_names, DoRA and the
  other variants, extra forward arguments) takes peft's own forward.

The weights and their names are peft's, so saved adapters load with plain peft.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ptft.methods.lora_merged_weight import merged_lora_linear


class FastLoraLinear(PeftLoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or self.lora_variant:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x)
        adapters = [adapter for adapter in self.active_adapters if adapter in self.lora_A]
        if torch.is_grad_enabled() and len(adapters) == 1 and self._merges(adapters[0]):
            adapter = adapters[0]
            return merged_lora_linear(x, self.base_layer.weight, self.base_layer.bias,
                                      self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                      self.scaling[adapter])
        result = self.base_layer(x)
        for adapter in adapters:
            lora_A = self.lora_A[adapter]
            update = self.lora_B[adapter](lora_A(self.lora_dropout[adapter](
                self._cast_input_dtype(x, lora_A.weight.dtype))))
            result.add_(update, alpha=self.scaling[adapter])
        return result

    def _merges(self, adapter: str) -> bool:
        """Whether the merged-weight path computes exactly this layer's LoRA: a plain, frozen
        nn.Linear base (not a subclass such as a quantised layer), no bias on B, and no dropout
        (dropout applies to the update's input only, which a merged weight cannot express)."""
        base = self.base_layer
        dropout = self.lora_dropout[adapter]
        return (type(base) is torch.nn.Linear and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad)
                and self.lora_B[adapter].bias is None
                and (isinstance(dropout, torch.nn.Identity) or not dropout.training))


def use_fast_lora(lora_config) -> None:
    """Have peft build FastLoraLinear for every nn.Linear it adapts under `lora_config`
    (peft's custom-module hook; a peft without it keeps its own layer)."""
    register = getattr(lora_config, "_register_custom_module", None)
    if register is not None:
        register({torch.nn.Linear: FastLoraLinear})
