"""The site's privacy ledger: every Opacus RDP accountant history the site ever had, never reset.

A hospital promises its ethics board an (epsilon, delta) bound per patient over every round, run and restart.
The accountant therefore lives on the site's disk (`<data>/.equifed/privacy_ledger.json`), not in a training
process: every noised optimizer step and every released statistic is appended to it and the file is rewritten
atomically before the step's result can be used.

The budget is enforced on the composition of *every* history in the file: a dataset keeps its own history
(keyed by a fingerprint of its patients and image contents), but a patient may be in every version of the
site's data, so the site's epsilon is that of all histories together (the conservative bound). Changing the
data (adding patients, editing the manifest) therefore never grants a fresh budget.

A ledger that cannot be read, whose checksum does not match, or that holds fewer steps than its witness file
stops training with LedgerError. It is never overwritten or reset.

fingerprint: which dataset a history belongs to; storage: the file, its lock, format and witness;
accounting: epsilon by Opacus' RDP analysis; report: the ethics board's view; privacy_ledger: PrivacyLedger.
"""

from client.ledger.fingerprint import FINGERPRINT_CACHE, SITE_KEY, dataset_fingerprint, dataset_tag
from client.ledger.privacy_ledger import BudgetExhausted, PrivacyLedger, os_entropy_rng
from client.ledger.report import RDP_NOTE, ledger_report
from client.ledger.storage import (
    DEFAULT_DELTA,
    LEDGER_FILE,
    STATE_DIR,
    VERSION,
    WITNESS_FILE,
    LedgerError,
    ledger_path,
    load_ledger_file,
    witness_path,
)

__all__ = [
    "BudgetExhausted",
    "DEFAULT_DELTA",
    "FINGERPRINT_CACHE",
    "LEDGER_FILE",
    "LedgerError",
    "PrivacyLedger",
    "RDP_NOTE",
    "SITE_KEY",
    "STATE_DIR",
    "VERSION",
    "WITNESS_FILE",
    "dataset_fingerprint",
    "dataset_tag",
    "ledger_path",
    "ledger_report",
    "load_ledger_file",
    "os_entropy_rng",
    "witness_path",
]
