"""What a site and the server agree on without importing each other: error codes and record names.

The client and the server meet only through Flower messages; both read these names from here.
"""

BUDGET_EXHAUSTED = 4001  # the site's privacy budget would be passed: it sits this request out
POLICY_REFUSED = 4002  # the request conflicts with the site's own privacy policy (the reason names the setting)

STATUS_OF_ERROR = {BUDGET_EXHAUSTED: "budget exhausted", POLICY_REFUSED: "refused by policy"}

DISCLOSURE = "disclosure"  # ConfigRecord of a reply: which of its metrics are noised, which are withheld (NaN)
