"""Metric names out of PromQL expressions: a small tokenizer, enough for names.

An identifier is a metric name unless it is a function (followed by ``(``), a keyword or
operator word, inside a label matcher ``{...}`` or a range ``[...]``, or in the label list after
``by``/``without``/``on``/``ignoring``/``group_left``/``group_right``. Grafana variables
(``$__rate_interval``, ``${datasource}``) and strings are dropped first.
"""

from __future__ import annotations

import re

FUNCTIONS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv double_exponential_smoothing exp floor histogram_avg
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters hour idelta increase info irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time
    stdvar_over_time sum_over_time tan tanh time timestamp vector year
    """.split()  # noqa: SIM905
)
AGGREGATIONS = frozenset(
    """
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio
    """.split()  # noqa: SIM905
)
LABEL_LIST_WORDS = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
KEYWORDS = (
    frozenset(["and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"]) | LABEL_LIST_WORDS
)

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>[{}()\[\],])
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=@:])
  | (?P<space>\s+|\#[^\n]*)
    """,
    re.VERBOSE,
)


class PromQLSyntaxError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match:
            raise PromQLSyntaxError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "variable", "string"):
            out.append((kind, match.group()))
        elif kind == "variable":
            # A Grafana variable stands for a value (a duration, a regex): keep a placeholder.
            out.append(("number", "0"))
        pos = match.end()
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads; unknown function names are an error."""
    toks = tokens(expr)
    names: set[str] = set()
    depth_braces = depth_brackets = 0
    skip_label_list = False
    label_list_depth = 0
    for index, (kind, text) in enumerate(toks):
        following = toks[index + 1][1] if index + 1 < len(toks) else ""
        if kind == "punct":
            if text == "{":
                depth_braces += 1
            elif text == "}":
                depth_braces -= 1
            elif text == "[":
                depth_brackets += 1
            elif text == "]":
                depth_brackets -= 1
            elif text == "(" and skip_label_list:
                label_list_depth += 1
            elif text == ")" and label_list_depth:
                label_list_depth -= 1
                if not label_list_depth:
                    skip_label_list = False
            continue
        if kind != "ident" or depth_braces or depth_brackets or label_list_depth:
            continue
        if text in LABEL_LIST_WORDS:
            skip_label_list = following == "("
            continue
        if text in KEYWORDS:
            continue
        if following == "(":
            if text not in FUNCTIONS and text not in AGGREGATIONS:
                raise PromQLSyntaxError(f"unknown PromQL function {text!r} in {expr!r}")
            continue
        if text in AGGREGATIONS and following in ("by", "without"):
            continue
        names.add(text)
    if depth_braces or depth_brackets or label_list_depth:
        raise PromQLSyntaxError(f"unbalanced brackets in {expr!r}")
    return names
