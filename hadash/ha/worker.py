"""The HA worker step (R11, R12): claim one due item and hand it to its handler.

It sits above `hadash.ha.work` (claiming, steps, retries) and `hadash.ha.handlers`
(what each type of item does), so neither of those imports the other in a circle.
"""

from __future__ import annotations

import logging

from hadash import config, outage
from hadash.models import HaWork

from .handlers import HANDLERS
from .work import LostItem, claim, release_after_db_error, release_claim

log = logging.getLogger("hadash.work")


def worker_step(engine, cfg=None) -> bool:
    """Claim and process one due item. Returns True when an item was processed (more
    may be due), False when there was nothing to take."""
    cfg = cfg or config.snapshot()
    item = claim(engine, cfg)
    if item is None:
        return False
    process(engine, item, cfg)
    return True


def process(engine, item: HaWork, cfg) -> None:
    # Our claim as taken: a failed transaction may leave the item's attributes
    # changed in memory (rolled back in the database), so releases go by this.
    taken = (item.pk, item.taken_by, item.taken)
    try:
        HANDLERS[item.type](engine, item, cfg)
    except LostItem:
        log.warning("work #%s was retaken by another worker; dropping our result", item.pk)
    except outage.DB_ERRORS as exc:
        release_after_db_error(engine, taken, exc)
    except Exception as exc:  # one bad item never stops the workers
        log.exception("work #%s failed", item.pk)
        try:
            release_claim(taken, now=engine.now(), after=cfg["investigate.retry.interval"],
                          message=f"internal error: {type(exc).__name__}: {exc}")
        except outage.DB_ERRORS as exc:
            release_after_db_error(engine, taken, exc)
        except Exception:
            log.exception("could not release work #%s", item.pk)


__all__ = ["worker_step", "process"]
