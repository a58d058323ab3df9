"""FIM-Merging's residual norm calibration ([FIMMerging] Algorithm 1, step 5), the ``finish`` pass of ``fim_ta``
and ``fim_ties``: base and merged model run the same random-token probes, each merged layer fed the base's hidden
states; a layer whose residual update norm is off by more than ``epsilon`` gets its residual writers rescaled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergelab.errors import RecipeError
from mergelab.fisher import FisherSettings, random_tokens, vocab_size
from mergelab.methods.context import ModelContext
from mergelab.methods.spec import ModelPass
from mergelab.streamed_lm import first_output, hidden_input, with_hidden_input

RESIDUAL_WRITERS = ("attn_o", "mlp_down")


def layer_update_norms(model: torch.nn.Module, folder: Path, tokens: torch.Tensor, device: str,
                       replay: list[list[torch.Tensor]] | None = None) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Norm of each decoder layer's residual update ``h_out − h_in`` over all probe tokens, and the layer inputs
    seen (per probe, per layer), for ``model`` (loaded from ``folder``). With ``replay`` each layer is fed those
    inputs instead of its own, so a layer is measured on the base's hidden states and a louder earlier layer does
    not make a later one look off.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise RecipeError(f"{folder}: residual norm calibration needs a decoder with model.layers; set "
                          "calibrate: false")
    squares = [0.0] * len(layers)
    seen: list[list[torch.Tensor]] = []

    def before(index: int):
        def hook(module, args, kwargs):
            hidden = hidden_input(args, kwargs)
            if replay is not None:
                hidden = replay[len(seen) - 1][index].to(hidden)
                args, kwargs = with_hidden_input(args, kwargs, hidden)
            seen[-1].append(hidden)
            return args, kwargs
        return hook

    def after(index: int):
        def hook(module, args, kwargs, output):
            out = first_output(output)
            squares[index] += float((out - seen[-1][index]).double().square().sum())
        return hook

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(before(i), with_kwargs=True),
        layer.register_forward_hook(after(i), with_kwargs=True))]
    try:
        with torch.no_grad():
            for row in tokens:
                seen.append([])
                model(input_ids=row[None].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return [value ** 0.5 for value in squares], seen


def calibrate(context: ModelContext) -> ModelPass:
    """Residual norm calibration (Algorithm 1, step 5): rescale the residual writers of any layer whose update
    norm on random probes is off from the base's by more than ``epsilon`` (relative)."""
    params = context.shared_params
    if not params["calibrate"]:
        return ModelPass(record={"calibrated_layers": []})
    base_reader, merged = context.readers[context.base], context.merged
    probes = random_tokens(FisherSettings(params["fisher_samples"], params["fisher_length"], params["fisher_seed"] + 1),
                           vocab_size(base_reader.config, base_reader.folder))
    with context.causal_lm(base_reader) as model:
        base_norms, base_inputs = layer_update_norms(model, base_reader.folder, probes, context.device)
    with context.causal_lm(merged) as model:
        merged_norms, _ = layer_update_norms(model, merged.folder, probes, context.device, replay=base_inputs)
    ratios = [m / b if b > 0 else 1.0 for m, b in zip(merged_norms, base_norms)]
    off = [lay for lay, ratio in enumerate(ratios) if ratio > 0 and abs(ratio - 1.0) > params["epsilon"]]
    scales = {job.name: 1.0 / ratios[job.info.layer] for job in context.tensors
              if job.info.layer in off and job.info.kind in RESIDUAL_WRITERS}
    return ModelPass(scales=scales, record={"norm_ratio": ratios, "calibrated_layers": off,
                                            "epsilon": params["epsilon"]})
