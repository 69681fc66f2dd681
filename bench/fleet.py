"""The fleet model: what N hosts polling one repository cost it (docs/operations.md#fleet-scale).

From the poll interval, its jitter, the first-poll spread, the publish cadence and
rollout schedule, the manifest's size and the bundles' sizes, it computes the
repository's requests per second (mean, and the 99th percentile of the per-second
counts over a day) and its egress per day; also the burst after a fleet-wide restart.
``bench/bench_fleet.py`` checks it against 50 real daemons polling a real nginx.

What one host does (``service/checks.py``, ``fetch/sources.py``): it polls every
``interval × (1 ± jitter)`` (uniform), the first time a uniform ``0–first_poll_spread``
after it starts. A poll of an unchanged manifest is one conditional GET answered 304.
A poll after a publish (and the first poll after a start, which has no validators) is
two GETs answered 200: the manifest and its signature. A host newly in a patch's
rollout then downloads the bundle for its arch (one GET; a resume after an interruption
would add Range requests, not modelled). Each publish of a patch's rollout step adds
the hosts of the step's increase; a renewal only changes the manifest.

Per-second counts: each host polls at most once per second (intervals are longer), so
in a second of steady polling the count is Binomial(N, 1/interval); in the interval
after a publish, a polling host makes 2 requests and, with the probability of the step's
increase, a third. The day's p99 is taken over the mixture of both kinds of seconds.

    .venv/bin/python bench/fleet.py                 # 1 million hosts polling hourly
    .venv/bin/python bench/fleet.py --hosts 100000 --interval 900 --manifest-kb 8
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

DAY = 86400.0


@dataclass(frozen=True)
class Fleet:
    """The inputs of the model (sizes in bytes, times in seconds)."""

    hosts: int = 1_000_000
    interval: float = 3600.0
    jitter: float = 0.1
    first_poll_spread: float = 60.0
    #: New patches a day; each goes out in the ``rollout`` steps, one publish each.
    patches_per_day: float = 1.0
    rollout: tuple[int, ...] = (10, 50, 100)
    #: Publishes a day that change nothing but the expiry (a nightly renewal).
    renewals_per_day: float = 1.0
    manifest: int = 8 * 1024
    signature: int = 180
    #: The mean size of the bundle a host downloads for a patch (its arch's).
    bundle: int = 5 * 1000 * 1000
    #: Response bytes besides the body (status line and headers), per kind of answer.
    header_200: int = 250
    header_304: int = 175
    #: Daemon starts per host a day (reboots): each first poll fetches manifest + signature.
    restarts_per_day: float = 0.0

    @property
    def publishes_per_day(self) -> float:
        return self.patches_per_day * len(self.rollout) + self.renewals_per_day


@dataclass(frozen=True)
class Figures:
    polls: float             # per day
    changed_polls: float     # polls that fetched manifest + signature, per day
    bundles: float           # bundle downloads per day
    requests: float          # per day
    mean_rps: float
    p99_rps: int
    egress: float            # response bytes per day, headers included
    body: float              # of which bodies
    restart_peak_rps: float  # in the first-poll spread after every host restarted at once
    restart_peak_bps: float  # bytes per second then


# --- distributions ----------------------------------------------------------------------


def binomial_pmf(n: int, p: float) -> list[float]:
    """P(X = k) for k around the mean (±12 sd): the rest is negligible here."""
    if n == 0 or p <= 0:
        return [1.0]
    p = min(p, 1.0)
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    top = min(n, int(mean + 12 * sd + 10))
    log_p, log_q = math.log(p), math.log1p(-p) if p < 1 else -math.inf
    out = []
    for k in range(top + 1):
        if p == 1:
            out.append(1.0 if k == n else 0.0)
            continue
        log = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
               + k * log_p + (n - k) * log_q)
        out.append(math.exp(log))
    return out


def changed_second_pmf(n: int, p: float, extra: float) -> list[float]:
    """Requests in one second after a publish: 2 per polling host, plus 1 with ``extra``."""
    base = binomial_pmf(n, p)
    out = [0.0] * (3 * len(base))
    for x, px in enumerate(base):
        if px < 1e-15:
            continue
        for y, py in enumerate(binomial_pmf(x, extra) if extra > 0 else [1.0]):
            out[2 * x + y] += px * py
    return out


def quantile(mixture: Sequence[tuple[float, Sequence[float]]], q: float) -> int:
    """The smallest k with P(count ≤ k) ≥ q for a mixture of (weight, pmf)."""
    size = max(len(pmf) for _, pmf in mixture)
    total = 0.0
    for k in range(size):
        total += sum(w * pmf[k] for w, pmf in mixture if k < len(pmf))
        if total >= q:
            return k
    return size


# --- the model ----------------------------------------------------------------------------


def model(f: Fleet) -> Figures:
    """A day of the fleet in steady state (the publishes spread over the day)."""
    polls_per_host = DAY / f.interval
    changes_per_host = min(f.publishes_per_day, polls_per_host)
    polls = f.hosts * polls_per_host
    changed = f.hosts * (changes_per_host + f.restarts_per_day)
    # Each host takes each patch once (the steps' increases add up to the last step).
    taken = f.rollout[-1] / 100 if f.rollout else 1.0
    bundles = f.hosts * min(f.patches_per_day, polls_per_host) * taken
    requests = polls + changed + bundles
    body = changed * (f.manifest + f.signature) + bundles * f.bundle
    headers = (polls - changed) * f.header_304 + (2 * changed + bundles) * f.header_200
    # Per-second counts: steady seconds, and seconds within an interval after a publish.
    p = 1 / f.interval
    after_publish = min(1.0, f.publishes_per_day * f.interval / DAY)
    steps = [b - a for a, b in zip((0, *f.rollout), f.rollout, strict=False)]
    mixture: list[tuple[float, Sequence[float]]] = [(1 - after_publish,
                                                      binomial_pmf(f.hosts, p))]
    if after_publish > 0:
        share = after_publish / (len(steps) * f.patches_per_day + f.renewals_per_day) \
            if f.publishes_per_day else 0.0
        for step in steps:
            mixture.append((share * f.patches_per_day,
                            changed_second_pmf(f.hosts, p, step / 100)))
        if f.renewals_per_day:
            mixture.append((share * f.renewals_per_day, changed_second_pmf(f.hosts, p, 0)))
    p99 = quantile(mixture, 0.99)
    spread = max(f.first_poll_spread, 1.0)
    return Figures(polls=polls, changed_polls=changed, bundles=bundles, requests=requests,
                   mean_rps=requests / DAY, p99_rps=p99, egress=body + headers, body=body,
                   restart_peak_rps=2 * f.hosts / spread,
                   restart_peak_bps=f.hosts * (f.manifest + f.signature + 2 * f.header_200)
                   / spread)


# --- a window of a run (for bench_fleet.py) ---------------------------------------------


@dataclass(frozen=True)
class Publish:
    """One publish during a window: when, the sizes hosts fetch after it, and the share of
    hosts that newly take its bundle (the rollout step's increase; 0 for a renewal)."""

    at: float
    manifest: int
    signature: int
    bundle: int = 0
    newly: float = 0.0


@dataclass(frozen=True)
class Window:
    """Hosts in steady polling over ``[start, end)``; every publish's effect inside it."""

    hosts: int
    interval: float
    jitter: float
    start: float
    end: float
    publishes: tuple[Publish, ...] = field(default=())
    header_200: int = 250
    header_304: int = 180


@dataclass(frozen=True)
class WindowFigures:
    requests: float
    mean_rps: float
    p99_rps: int
    body: float
    egress: float


def window_model(w: Window) -> WindowFigures:
    """Expected requests and bytes of the window, and the p99 of its per-second counts."""
    length = w.end - w.start
    polls = w.hosts * length / w.interval
    changed = w.hosts * len(w.publishes)
    bundles = sum(w.hosts * p.newly for p in w.publishes)
    requests = polls + changed + bundles
    body = sum(w.hosts * (p.manifest + p.signature + p.newly * p.bundle) for p in w.publishes)
    headers = (polls - changed) * w.header_304 + (2 * changed + bundles) * w.header_200
    p = 1 / w.interval
    after = min(length, len(w.publishes) * w.interval) / length
    mixture: list[tuple[float, Sequence[float]]] = [(1 - after, binomial_pmf(w.hosts, p))]
    for pub in w.publishes:
        mixture.append((after / len(w.publishes), changed_second_pmf(w.hosts, p, pub.newly)))
    return WindowFigures(requests=requests, mean_rps=requests / length,
                         p99_rps=quantile(mixture, 0.99), body=body, egress=body + headers)


# --- the command --------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def report(f: Fleet) -> Figures:
    fig = model(f)
    print(f"{f.hosts:,} hosts polling every {f.interval:g} s (±{f.jitter:.0%}); "
          f"{f.patches_per_day:g} patch/day in steps {list(f.rollout)} + "
          f"{f.renewals_per_day:g} renewal/day = {f.publishes_per_day:g} publishes/day; "
          f"manifest {_size(f.manifest)}, bundle {_size(f.bundle)}")
    print(f"  requests: {fig.requests:,.0f}/day = {fig.mean_rps:,.1f}/s mean, "
          f"p99 {fig.p99_rps:,}/s")
    print(f"  of which: {fig.polls:,.0f} polls, {fig.changed_polls:,.0f} after a change "
          f"(+1 signature each), {fig.bundles:,.0f} bundle downloads")
    print(f"  egress: {_size(fig.egress)}/day ({_size(fig.body)} bodies; manifests "
          f"{_size(fig.changed_polls * (f.manifest + f.signature))}, bundles "
          f"{_size(fig.bundles * f.bundle)})")
    print(f"  all restarted at once: {fig.restart_peak_rps:,.0f} requests/s, "
          f"{_size(fig.restart_peak_bps)}/s for {f.first_poll_spread:g} s")
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Fleet()
    parser.add_argument("--hosts", type=int, default=d.hosts)
    parser.add_argument("--interval", type=float, default=d.interval, help="seconds")
    parser.add_argument("--jitter", type=float, default=d.jitter)
    parser.add_argument("--spread", type=float, default=d.first_poll_spread,
                        help="first-poll spread, seconds")
    parser.add_argument("--patches-per-day", type=float, default=d.patches_per_day)
    parser.add_argument("--rollout", default=",".join(map(str, d.rollout)),
                        help="steps, e.g. 10,50,100")
    parser.add_argument("--renewals-per-day", type=float, default=d.renewals_per_day)
    parser.add_argument("--manifest-kb", type=float, default=d.manifest / 1024)
    parser.add_argument("--bundle-mb", type=float, default=d.bundle / 1e6)
    args = parser.parse_args()
    fleet = Fleet(hosts=args.hosts, interval=args.interval, jitter=args.jitter,
                  first_poll_spread=args.spread, patches_per_day=args.patches_per_day,
                  rollout=tuple(int(x) for x in args.rollout.split(",") if x),
                  renewals_per_day=args.renewals_per_day,
                  manifest=int(args.manifest_kb * 1024), bundle=int(args.bundle_mb * 1e6))
    report(fleet)
    print()
    report(replace(fleet, manifest=314 * 1000))  # the same year, manifest unbounded
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
