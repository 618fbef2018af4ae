"""What a site and the server agree on without importing each other: error codes and record names.

The client and the server meet only through Flower messages; both read these names from here.
"""

import re

BUDGET_EXHAUSTED = 4001  # the site's privacy budget would be passed: it sits this request out
POLICY_REFUSED = 4002  # the request conflicts with the site's own privacy policy (the reason names the setting)

STATUS_OF_ERROR = {BUDGET_EXHAUSTED: "budget exhausted", POLICY_REFUSED: "refused by policy"}
_SITE_IN_REASON = re.compile(r"(?:^|[\s'<])site ([^\s:]+): ")


def site_error(site: str, text: str) -> str:
    """An error reply's reason that names the site (Flower's Error carries a code and a text only)."""
    return f"site {site}: {text}"


def error_site(reason: str) -> str | None:
    """The site a reason from `site_error` names, also inside the text Flower wraps around a ClientApp's
    exception; None when it names none."""
    found = _SITE_IN_REASON.search(reason)
    return found.group(1) if found else None


def error_status(code: int) -> str:
    """How a per-site row reads an error reply's code."""
    return STATUS_OF_ERROR.get(int(code), "error")

DISCLOSURE = "disclosure"  # ConfigRecord of a reply: which of its metrics are noised, which are withheld (NaN)

BOX_EXAMPLES = "box-examples"  # train metric of a detection round: the annotated images the site trained the head on
DETECTION_HEAD = "head."  # state-dict prefix of a LesionDetector's own head (the classifier's keys are "classifier.")

PRIVACY = "privacy"  # ConfigRecord of a reply that spent privacy: the dataset tag its spend belongs to
DATASET_TAG = "dataset-tag"  # a keyed hash of the site's dataset (never the dataset's own fingerprint)
