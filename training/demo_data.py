"""Sample data: card payments with mixed column types, and a documented way to make anomalies.

Normal payments follow simple, realistic dependencies:

- ``merchant_category`` (8 values) sets the typical ``amount`` (log-normal) and ``hour``;
- ``online_retail`` payments are card-not-present, have a ``device`` and no
  ``distance_from_home_km`` (missing); card-present ones have no device (missing);
- ``country`` is the home country (US) most of the time; ``customer_age`` is sometimes missing;
- ``tx_last_24h`` counts the card's payments in the last day.

Anomalies (``make_anomalies``) are normal payments changed in one of these ways (``KINDS``):

- ``amount``: 20 to 60 times the usual amount for the category;
- ``foreign_night``: card present in a country never seen in training, at 2-4 am, far from home;
- ``velocity``: 25 to 60 payments in the last 24 hours;
- ``card_mismatch``: an online-retail payment with the card present, far from home;
- ``new_merchant``: a merchant category never seen in training, with a large amount.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CATEGORIES = {  # name: (share, median amount, typical hour, hour spread)
    "grocery": (0.25, 45.0, 17, 3.0),
    "restaurant": (0.18, 35.0, 19, 2.5),
    "fuel": (0.12, 55.0, 12, 4.0),
    "online_retail": (0.15, 80.0, 20, 3.5),
    "pharmacy": (0.08, 25.0, 14, 3.0),
    "electronics": (0.05, 300.0, 15, 3.0),
    "travel": (0.04, 450.0, 11, 3.0),
    "entertainment": (0.13, 60.0, 21, 2.0),
}
COUNTRIES = {"US": 0.93, "CA": 0.03, "MX": 0.02, "GB": 0.01, "DE": 0.007, "FR": 0.003}
DEVICES = {"mobile": 0.6, "desktop": 0.32, "tablet": 0.08}
KINDS = ("amount", "foreign_night", "velocity", "card_mismatch", "new_merchant")


def _choice(rng: np.random.Generator, table: dict[str, float], n: int) -> np.ndarray:
    p = np.array(list(table.values()))
    return rng.choice(np.array(list(table)), size=n, p=p / p.sum())


def generate_payments(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` normal payments."""
    rng = np.random.default_rng(seed)
    cat = _choice(rng, {k: v[0] for k, v in CATEGORIES.items()}, n)
    median = np.array([CATEGORIES[c][1] for c in cat])
    hour_mu = np.array([CATEGORIES[c][2] for c in cat])
    hour_sd = np.array([CATEGORIES[c][3] for c in cat])
    online = cat == "online_retail"
    card_present = ~online & (rng.random(n) < 0.97)
    distance = np.where(card_present, rng.exponential(6.0, n), np.nan)
    age = np.clip(rng.normal(45, 14, n), 18, 90).round()
    age[rng.random(n) < 0.03] = np.nan
    device = np.where(~card_present, _choice(rng, DEVICES, n), np.array(None, dtype=object))
    return pd.DataFrame(
        {
            "transaction_id": [f"tx-{seed:03d}-{i:08d}" for i in range(n)],
            "amount": np.round(median * rng.lognormal(0.0, 0.6, n), 2),
            "hour": np.clip(np.round(rng.normal(hour_mu, hour_sd)), 0, 23).astype(int),
            "merchant_category": cat,
            "country": _choice(rng, COUNTRIES, n),
            "card_present": card_present,
            "distance_from_home_km": np.round(distance, 2),
            "customer_age": age,
            "tx_last_24h": rng.poisson(2.0, n) + 1,
            "device": device,
        }
    )


def make_anomalies(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> pd.DataFrame:
    """``n`` anomalous payments, cycling through ``kinds``; column ``anomaly_kind`` says which."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown anomaly kinds {sorted(unknown)}; known: {KINDS}")
    rng = np.random.default_rng(seed + 10_000)
    df = generate_payments(n, seed + 10_000)
    kind = np.array([kinds[i % len(kinds)] for i in range(n)])
    for k in kinds:
        m = kind == k
        c = int(m.sum())
        if k == "amount":
            df.loc[m, "amount"] = (df.loc[m, "amount"] * rng.uniform(20, 60, c)).round(2)
        elif k == "foreign_night":
            df.loc[m, "country"] = rng.choice(["NG", "RU", "BR", "VN"], c)
            df.loc[m, "hour"] = rng.integers(2, 5, c)
            df.loc[m, "card_present"] = True
            df.loc[m, "device"] = None
            df.loc[m, "distance_from_home_km"] = rng.uniform(5000, 12000, c).round(2)
        elif k == "velocity":
            df.loc[m, "tx_last_24h"] = rng.integers(25, 61, c)
        elif k == "card_mismatch":
            df.loc[m, "merchant_category"] = "online_retail"
            df.loc[m, "card_present"] = True
            df.loc[m, "device"] = None
            df.loc[m, "distance_from_home_km"] = rng.uniform(800, 3000, c).round(2)
        elif k == "new_merchant":
            df.loc[m, "merchant_category"] = "crypto_exchange"
            df.loc[m, "amount"] = rng.uniform(2000, 9000, c).round(2)
    df["transaction_id"] = [f"anomaly-{seed:03d}-{i:08d}" for i in range(n)]
    df["anomaly_kind"] = kind
    return df


def labelled(n_normal: int, n_anomalies: int, seed: int = 0) -> pd.DataFrame:
    """Normal and anomalous payments shuffled together, with an ``is_anomaly`` 0/1 column."""
    normal = generate_payments(n_normal, seed).assign(is_anomaly=0)
    anomalies = make_anomalies(n_anomalies, seed).drop(columns="anomaly_kind").assign(is_anomaly=1)
    df = pd.concat([normal, anomalies], ignore_index=True)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
