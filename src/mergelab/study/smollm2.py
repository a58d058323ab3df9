"""The four study protocols on the ``smollm2`` zoo (``mergelab study PROTOCOL --zoo smollm2``).

The members are full fine-tunes of the real SmolLM2-135M-Instruct (``mergelab.zoo.smollm2``): ``reasoning``
(worked GSM8K solutions), ``short`` (``#### N`` only, the same questions), ``low_quality`` (answers of other
questions) and the overlapping text experts ``code``, ``prose``, ``manpages``, ``legal``. Every model is measured
the same way, on held-out data only:

- GSM8K (``mergelab.evaluation.gsm8k``): greedy, chat template, up to 256 new tokens: accuracy, mean length,
  repetition rate, seq-rep-4, distinct-n, output entropy (``runner.stability``); with samples, pass@k and
  self-consistency at temperature 0.3 (long-to-short only);
- per text domain (``mergelab.evaluation.heldout``): perplexity on held-out chunks and continuations of 256
  tokens from their first 64 tokens, greedy and sampled at temperature 0.7 (repetition rate, distinct-2,
  entropy; the base already loops in most greedy continuations, so the sampled ones are the ones that can
  show a merge's repetition collapse). The ``gsm8k`` text domain is the held-out questions followed by their
  reference solutions.

A model's score on a domain is its held-out perplexity; "relative perplexity" is the geometric mean over
domains of ``ppl(model) / ppl(base)`` (below 1: better than the base). At 135M parameters GSM8K accuracy is
near chance for every member (docs/ZOO.md), so the perplexity of the reference solutions is the math domain's
score, and accuracy is shown where it is measured.

Protocols (each a ``Protocol`` with the attributes ``mergelab.study.protocol`` expects):

- ``long-to-short`` (FIM-Merging, Tables 2-4, Figure 2): ``short`` is the base, ``reasoning`` the one expert,
  the methods of ``long_to_short.methods()``; with 30 decoder layers FIM's per-layer α takes 30 values. Also TA
  at more λ and the NL scores of ``reasoning − short`` (``l2s_linearity``: is TA linear in λ, section 3).
- ``scf`` (SCF-RKL, Table 1 and Figure 1; Tables 3-4): the pairs ``complementary`` (reasoning + code) and
  ``strong_weak`` (reasoning + low_quality); SCF-RKL fuses the pair directly (M0 = the first), the baselines
  merge both task vectors against the base with the demo's recipes (``demo.recipes``), SCF-KL beside SCF-RKL.
- ``karcher`` (Fisher-Rao Karcher, Figure 1 and Tables 3-5): the first m of ``KARCHER_ORDER`` at every m from
  2 to the pool size, the methods of ``karcher.methods()``; score: relative perplexity over the merged
  experts' domains (perplexity only: no generation in these jobs).
- ``in-the-wild`` (in-the-wild merging, Tables 1-2, Figure 3): random subsets of the seven fine-tunes
  (``low_quality`` included) of each size n, the methods of ``in_the_wild.METHODS``; a merge is "above the
  base" when its relative perplexity over all five domains is below 1, "above the best expert" when below the
  best expert's (perplexity only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.citations import FISHER_RAO, IN_THE_WILD, SCF_RKL, cite
from mergelab.study.jobs import Job
from mergelab.study.report import line_plot, scatter_plot, table
from mergelab.study.settings import StudySettings

FAMILY = "smollm2"
DOMAINS = ("gsm8k", "code", "prose", "manpages", "legal")
OWN_DOMAIN = {"reasoning": "gsm8k", "short": "gsm8k", "low_quality": "gsm8k", "code": "code", "prose": "prose",
              "manpages": "manpages", "legal": "legal"}
KARCHER_ORDER = ("reasoning", "code", "prose", "manpages", "legal")
WILD_POOL = ("reasoning", "short", "low_quality", "code", "prose", "manpages", "legal")
PAIRS = {"complementary": ("reasoning", "code"), "strong_weak": ("reasoning", "low_quality")}
SEED = 0
PROBES_PER_DOMAIN, PROBE_TOKENS = 4, 128  # karcher's activation probes: held-out texts of each merged domain
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"gsm8k_items": 10, "samples": 1, "texts": 2, "new_tokens": 256,
              "karcher_ms": (2, 3), "karcher_methods": ("Karcher", "Lerp", "TIES"),
              "wild_n": (2, 4), "wild_subsets": 2, "wild_methods": ("TA", "TIES", "Model Stock", "Karcher"),
              "scf_methods": ("scf_rkl", "task_arithmetic", "ties")},
    # the zoo's ``test`` size (untrained plumbing): the quick protocol with 16-token generations
    "test": {"gsm8k_items": 2, "samples": 2, "texts": 2, "new_tokens": 16, "gsm8k_new_tokens": 16,
             "karcher_ms": (2, 3), "karcher_methods": ("Karcher", "TIES"),
             "wild_n": (2,), "wild_subsets": 1, "wild_methods": ("TA", "Karcher"),
             "scf_methods": ("scf_rkl", "task_arithmetic")},
    "full": {"gsm8k_items": 50, "samples": 4, "texts": 8, "new_tokens": 256,
             "karcher_ms": (2, 3, 4, 5), "karcher_methods": None,
             "wild_n": (2, 3, 4, 5, 6, 7), "wild_subsets": 5, "wild_methods": None,
             "scf_methods": None},
}


@dataclass(frozen=True)
class Protocol:
    """A study protocol as ``mergelab.study.protocol.run_study`` uses it (the attributes of a protocol module)."""

    TITLE: str
    PAPER: str
    plan: Callable[[StudySettings], tuple[list[Job], dict[str, Any]]]
    analyse: Callable[[dict[str, Any], dict[str, dict[str, Any]]], dict[str, Any]]
    figures: Callable[[Path, dict[str, Any], str], list[tuple[str, str]]]


def protocol(name: str) -> Protocol:
    """The smollm2 variant of protocol ``name`` (a key of ``mergelab.study.protocol.PROTOCOLS``)."""
    return PROTOCOLS[name]


# ---------------------------------------------------------------------------------------------- measuring


def _size(settings: StudySettings) -> dict[str, Any]:
    """``test`` on the zoo's test size, else ``quick`` or ``full``."""
    return SIZES["test" if settings.size() == "test" else "quick" if settings.quick else "full"]


def _family(settings: StudySettings, members: list[str]) -> Path:
    from mergelab import zoo

    return zoo.require(FAMILY, settings.size(), members, settings.build_zoo, settings.device, settings.progress)


def measure(settings: StudySettings, domains: tuple[str, ...] = DOMAINS, gsm8k: bool = True,
            samples: int = 1, continuations: bool = True) -> dict[str, Any]:
    """The Job fields of the module doc's measurement: GSM8K (when ``gsm8k``) and the held-out ``domains``
    (perplexity, and the continuations when ``continuations``: karcher and in-the-wild score perplexity only)."""
    size = _size(settings)
    fields: dict[str, Any] = {"heldout": {"size": settings.size(), "domains": list(domains),
                                          "n_texts": size["texts"], "new_tokens": size["new_tokens"],
                                          "continuations": continuations}}
    if gsm8k:
        options = {"chat": True, "batch_size": 4, "temperature": 0.3, "seed": 0}
        if "gsm8k_new_tokens" in size:
            options["max_new_tokens"] = size["gsm8k_new_tokens"]
        fields.update(tasks=["gsm8k"], n_items=size["gsm8k_items"], n_samples=samples, eval_options=options)
    return fields


def perplexities(result: dict[str, Any]) -> dict[str, float]:
    """Domain -> held-out perplexity of one job."""
    return {d: figures["perplexity"]["perplexity"] for d, figures in result["heldout"].items()}


def relative_perplexity(result: dict[str, Any], base: dict[str, Any], domains: list[str]) -> float:
    """Geometric mean over ``domains`` of ``ppl(result) / ppl(base)``: below 1 is better than the base."""
    mine, theirs = perplexities(result), perplexities(base)
    return math.exp(sum(math.log(mine[d] / theirs[d]) for d in domains) / len(domains))


def _gsm8k_cells(result: dict[str, Any]) -> list[Any]:
    greedy = result["eval"]["gsm8k"]["greedy"]
    return [greedy["accuracy"], greedy["mean_length"], greedy["repetition_rate"], greedy["distinct_2"],
            greedy.get("format_rate")]


def _repetition(result: dict[str, Any], domain: str) -> list[float]:
    """Repetition rate of the greedy and of the sampled continuations of ``domain``."""
    figures = result["heldout"][domain]
    return [figures["continuation"]["repetition_rate"], figures["continuation_sampled"]["repetition_rate"]]


# ---------------------------------------------------------------------------------------------- long-to-short


def _l2s_plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    from mergelab.study.l2s_linearity import with_linearity_jobs
    from mergelab.study.long_to_short import methods

    size = _size(settings)
    family = _family(settings, ["base", "short", "reasoning"])
    fields = measure(settings, ("gsm8k",), samples=size["samples"])
    jobs = [Job(label=name, model=str(family / name), **fields) for name in ("base", "short", "reasoning")]
    for label, (method, params) in methods().items():
        recipe = {"merge_method": method, "base_model": str(family / "short"),
                  "models": [{"model": str(family / "reasoning")}], "parameters": params, "seed": 0}
        jobs.append(Job(label=label, recipe=recipe, **fields))
    return with_linearity_jobs(jobs, {
        "family": str(family), "task": "gsm8k", "parents": ["base", "short", "reasoning"], "samples": size["samples"],
        "methods": list(methods()), "expert": "short",
        "note": "Merges take short as the base and reasoning as the one expert."}, "short", "reasoning")


def _l2s_analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The tiny-lm protocol's tables (``long_to_short.analyse``), then TA's linearity in λ (F5)."""
    from mergelab.study import l2s_linearity

    return l2s_linearity.protocol_analysis(context, results, "short", "reasoning")


# ---------------------------------------------------------------------------------------------- scf


def _scf_plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    from mergelab.study.demo import recipes
    from mergelab.study.scf_pairs import METHODS, SCF_KL, with_params

    size = _size(settings)
    wanted = size["scf_methods"] or tuple(METHODS)
    family = _family(settings, ["base", *{m for pair in PAIRS.values() for m in pair}])
    jobs: list[Job] = [Job(label="base", model=str(family / "base"), **measure(settings))]
    jobs += [Job(label=name, model=str(family / name), **measure(settings))
             for name in dict.fromkeys(m for pair in PAIRS.values() for m in pair)]
    for pair, (first, second) in PAIRS.items():
        made = recipes(family / "base", family / first, family / second)
        for method in wanted:
            jobs.append(Job(label=f"{pair}:{METHODS[method]}", recipe=made[method], **measure(settings)))
        jobs.append(Job(label=f"{pair}:{SCF_KL}", recipe=with_params(made["scf_rkl"], "scf_kl"), **measure(settings)))
    labels = [METHODS[m] for m in wanted] + [SCF_KL]
    return jobs, {"family": str(family), "pairs": {k: list(v) for k, v in PAIRS.items()}, "methods": labels}


def _scf_analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = results["base"]
    tables, points = [], {}
    for pair, (first, second) in context["pairs"].items():
        domains = sorted({OWN_DOMAIN[first], OWN_DOMAIN[second]}, key=DOMAINS.index)
        rows = []
        for label in ["base", first, second, *[f"{pair}:{m}" for m in context["methods"]]]:
            result = results[label]
            ppl = perplexities(result)
            rows.append([label.split(":", 1)[-1], *_gsm8k_cells(result), *[ppl[d] for d in domains],
                         *[rate for d in domains for rate in _repetition(result, d)],
                         relative_perplexity(result, base, list(DOMAINS)),
                         result.get("merge", {}).get("unchanged_from_base")])
            points[f"{pair}: {rows[-1][0]}"] = [rows[-1][2], rows[-1][1]]
        tables.append(table(
            f"{pair} pair ({first} + {second}): GSM8K and held-out text (Table 1; Tables 3-4 for strong-weak)",
            ["model", "GSM8K acc %", "GSM8K length", "GSM8K repetition %", "GSM8K distinct-2",
             "GSM8K answers in the #### format %", *[f"{d} ppl" for d in domains],
             *[f"{d} {kind} continuation repetition %" for d in domains for kind in ("greedy", "sampled")],
             "relative ppl (5 domains)", "unchanged from the recipe's base %"],
            ["text", "pct", "num", "pct", "num", "pct", *["num"] * len(domains), *["pct"] * (2 * len(domains)),
             "num", "pct"],
            rows, f"SCF-RKL fuses the pair directly (M0 = {first}, the recipe's base); the baselines merge both "
                  "task vectors into the zoo base. Repetition: generations that hit the token limit in a loop "
                  "(metrics.is_repetitive), the quantity of the paper's Figure 1: GSM8K answers (greedy, chat) and "
                  "continuations of held-out text (greedy and sampled at temperature 0.7)."))
    return {"tables": tables, "points": points}


def _scf_figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    name = scatter_plot(out / "gsm8k_accuracy_vs_length.png", "GSM8K accuracy against response length",
                        analysis["points"], "mean response length (tokens)", "GSM8K accuracy (%)", command).name
    return [(name, "GSM8K accuracy against response length")]


# ---------------------------------------------------------------------------------------------- karcher


def _karcher_plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    from mergelab.study.karcher import DIAGNOSED, methods
    from mergelab.zoo.smollm2 import SIZES as ZOO_SIZES
    from mergelab.zoo.smollm2 import heldout_texts

    size = _size(settings)
    chosen = {k: v for k, v in methods().items() if size["karcher_methods"] is None or k in size["karcher_methods"]}
    ms = list(size["karcher_ms"])
    used = list(KARCHER_ORDER[: max(ms)])
    family = _family(settings, ["base", *used])
    domains = tuple(OWN_DOMAIN[e] for e in used)
    fields = measure(settings, domains, gsm8k=False, continuations=False)
    jobs = [Job(label=f"parent:{name}", model=str(family / name), **fields) for name in ["base", *used]]
    diagnosed = [label for label in DIAGNOSED if label in chosen]
    probes = [text for d in domains for text in heldout_texts(d, ZOO_SIZES[settings.size()])[:PROBES_PER_DOMAIN]
              ] if diagnosed else []
    diagnostics = {"base": str(family / "base"), "experts": [str(family / e) for e in used], "prompts": probes,
                   "probe_length": PROBE_TOKENS, "nl_layers": []}
    for label, (method, params, with_base) in chosen.items():
        for m in ms:
            recipe: dict[str, Any] = {"merge_method": method, "parameters": params, "seed": SEED,
                                      "models": [{"model": str(family / e)} for e in KARCHER_ORDER[:m]]}
            if with_base:
                recipe["base_model"] = str(family / "base")
            probed = m == max(ms) and label in diagnosed
            jobs.append(Job(label=f"{label}|m={m}", recipe=recipe, activations=diagnostics if probed else None,
                            **fields))
    return jobs, {"family": str(family), "order": used, "ms": ms, "methods": list(chosen), "diagnosed": diagnosed}


def _karcher_analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from mergelab.study.karcher import best_methods, layer_diagnostics, ranks

    ms, order = context["ms"], context["order"]
    base = results["parent:base"]
    merged_domains = {m: [OWN_DOMAIN[e] for e in order[:m]] for m in ms}
    series = {label: [relative_perplexity(results[f"{label}|m={m}"], base, merged_domains[m]) for m in ms]
              for label in context["methods"]}
    best_expert = [min(relative_perplexity(results[f"parent:{e}"], base, [OWN_DOMAIN[e]]) for e in order[:m])
                   for m in ms]
    # lower is better: rank the negated values with karcher's highest-first helpers
    by_m = [{label: -values[i] for label, values in series.items()} for i in range(len(ms))]
    note = ("Best method at each m: "
            + "; ".join(f"m={m}: {best_methods(row)}" for m, row in zip(ms, by_m, strict=True))
            + ". Karcher's rank: " + ", ".join(f"m={m}: {ranks(row).get('Karcher')}"
                                                for m, row in zip(ms, by_m, strict=True))
            + f". Experts in order: {', '.join(order)}.")
    rows = [[label, *values] for label, values in series.items()]
    rows.append(["best merged expert on its own domain (reference)", *best_expert])
    per_domain = [[f"{label} (m={max(ms)})", *[perplexities(results[f"{label}|m={max(ms)}"])[OWN_DOMAIN[e]]
                                                for e in order]] for label in context["methods"]]
    per_domain += [[name, *[perplexities(results[f"parent:{name}"])[OWN_DOMAIN[e]] for e in order]]
                   for name in ["base", *order]]
    tables = [
        table("Relative held-out perplexity (merge / base, geometric mean over the merged experts' domains) "
              "against the number of merged models m (Figure 1; Tables 3-5; lower is better)",
              ["method", *[f"m={m}" for m in ms]], ["text", *["num"] * len(ms)], rows, note),
        table(f"Held-out perplexity per domain at m = {max(ms)} (Table 1)",
              ["model", *[OWN_DOMAIN[e] for e in order]], ["text", *["num"] * len(order)], per_domain),
    ]
    analysis = {"tables": tables, "curves": {"ms": ms, "series": {**series, "best expert (reference)": best_expert}}}
    if context.get("diagnosed"):  # Figure 2 / Table 7: activation statistics of Karcher, Lerp and TIES at the largest m
        m = max(ms)
        layers = layer_diagnostics({label: results[f"{label}|m={m}"]["activations"] for label in context["diagnosed"]},
                                   m, f"smollm2, m = {m}, held-out texts of the merged experts' domains")
        tables += layers.pop("tables")
        analysis["layers"] = layers
    return analysis


def _karcher_figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    from mergelab.study.karcher import layer_figures

    curve = analysis["curves"]
    line_plot(out / "figure1_smollm2.png", "smollm2: relative perplexity against m (Figure 1)", curve["ms"],
              curve["series"], "number of merged models m", "perplexity / base perplexity", command, percent=False)
    made = [("figure1_smollm2.png", "relative perplexity against m")]
    return made + (layer_figures(out, analysis["layers"], command) if "layers" in analysis else [])


# ---------------------------------------------------------------------------------------------- in the wild


def _wild_plan(settings: StudySettings) -> tuple[list[Job], dict[str, Any]]:
    from mergelab.study.in_the_wild import METHODS, recipe, sample_subsets

    size = _size(settings)
    chosen = [m for m in METHODS if size["wild_methods"] is None or m in size["wild_methods"]]
    pool = list(WILD_POOL)
    family = _family(settings, ["base", *pool])
    fields = measure(settings, DOMAINS, gsm8k=False, continuations=False)
    jobs = [Job(label=f"parent:{name}", model=str(family / name), **fields) for name in ["base", *pool]]
    subsets = {str(n): sample_subsets(pool, n, size["wild_subsets"], SEED) for n in size["wild_n"]}
    for n, drawn in subsets.items():
        for i, subset in enumerate(drawn):
            jobs += [Job(label=f"{method}|n={n}|s={i}", recipe=recipe(method, family, subset), **fields)
                     for method in chosen]
    return jobs, {"family": str(family), "pool": pool, "methods": chosen, "subsets": subsets}


def _wild_analyse(context: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from mergelab.study.in_the_wild import interference_cell, mean_std

    base, pool, domains = results["parent:base"], context["pool"], list(DOMAINS)
    score = {label: 0.0 - math.log(relative_perplexity(r, base, domains)) for label, r in results.items()}  # not -0.0
    experts = {e: score[f"parent:{e}"] for e in pool}
    best = max(experts, key=experts.get)
    ns = list(context["subsets"])

    def cell(values: list[float], reference: float) -> str:
        above = 100.0 * sum(v > reference for v in values) / len(values)
        return interference_cell(above, sum(v - reference for v in values) / len(values))

    merged = {m: {n: [score[f"{m}|n={n}|s={i}"] for i in range(len(context["subsets"][n]))] for n in ns}
              for m in context["methods"]}
    columns = [f"n={n} ({len(context['subsets'][n])})" for n in ns]
    tables = [
        table("Base and pool: held-out perplexity per domain (appendix A)", ["model", *domains, "score"],
              ["text", *["num"] * len(domains), "num"],
              [[name, *[perplexities(results[f"parent:{name}"])[d] for d in domains], score[f"parent:{name}"]]
               for name in ["base", *pool]],
              "score: −ln(relative perplexity over the five domains); 0 is the base, higher is better."),
        table("Against the base (Tables 1 and 3): % of merges with a higher score than the base / mean score "
              "difference", ["method", *columns], ["text", *["text"] * len(ns)],
              [[m, *[cell(merged[m][n], 0.0) for n in ns]] for m in context["methods"]]),
        table(f"Against the best single fine-tune, {best} (Table 2)", ["method", *columns],
              ["text", *["text"] * len(ns)],
              [[m, *[cell(merged[m][n], experts[best]) for n in ns]] for m in context["methods"]]),
        table("Mean score over the subsets (Figure 3)", ["method", *columns], ["text", *["num"] * len(ns)],
              [[m, *[mean_std(merged[m][n])[0] for n in ns]] for m in context["methods"]]),
    ]
    x = [int(n) for n in ns]
    return {"tables": tables, "curves": {"x": x, "series": {m: [mean_std(merged[m][n])[0] for n in ns]
                                                            for m in context["methods"]}}}


def _wild_figures(out: Path, analysis: dict[str, Any], command: str) -> list[tuple[str, str]]:
    curve = analysis["curves"]
    line_plot(out / "figure3_smollm2.png", "smollm2: mean score against the number of merged models (Figure 3)",
              curve["x"], curve["series"], "number of merged models n", "score (−ln relative perplexity)", command,
              percent=False)
    return [("figure3_smollm2.png", "mean score against n")]


class _Protocols(dict):
    """Protocol name -> ``Protocol``, made on first use (long-to-short extends the tiny-lm analysis)."""

    def __missing__(self, name: str) -> Protocol:
        from mergelab.study import l2s_linearity, long_to_short

        made = {
            "scf": lambda: Protocol("SCF-RKL on SmolLM2-135M fine-tunes", cite(SCF_RKL, "Tables 1, 3-4, Figure 1"),
                                    _scf_plan, _scf_analyse, _scf_figures),
            "karcher": lambda: Protocol("Karcher merging against baselines as m grows (SmolLM2-135M)",
                                        cite(FISHER_RAO, "Figure 1, Tables 1 and 3-5"),
                                        _karcher_plan, _karcher_analyse, _karcher_figures),
            "in-the-wild": lambda: Protocol("In-the-wild merging of SmolLM2-135M fine-tunes",
                                            cite(IN_THE_WILD, "Tables 1-3, Figure 3"),
                                            _wild_plan, _wild_analyse, _wild_figures),
            "long-to-short": lambda: Protocol(f"{long_to_short.TITLE} (smollm2)", long_to_short.PAPER,
                                              _l2s_plan, _l2s_analyse, l2s_linearity.protocol_figures),
        }[name]()
        self[name] = made
        return made


PROTOCOLS = _Protocols()
