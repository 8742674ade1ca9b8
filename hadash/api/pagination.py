"""Paging of the operator API's lists (issue 10 item 7).

Every list answers a JSON array — the shape PROTOCOL.md promises — and says where it
is in the whole in its headers:

- ``X-Total-Count``: how many rows match the request's filters (all pages);
- ``Link``: ``<…>; rel="next"`` and ``<…>; rel="prev"`` (RFC 8288) — the same request
  with ``offset`` moved by ``limit``; absent on the last / first page.

The count costs one COUNT query, skipped when the page itself shows the end (fewer
rows than asked for).
"""

from __future__ import annotations

from urllib.parse import urlencode

from drf_spectacular.utils import OpenApiParameter
from rest_framework.response import Response

TOTAL_HEADER = "X-Total-Count"

HEADERS = [
    OpenApiParameter(
        TOTAL_HEADER, int, OpenApiParameter.HEADER, response=[200],
        description="How many rows match the filters, on all pages together.",
    ),
    OpenApiParameter(
        "Link", str, OpenApiParameter.HEADER, response=[200],
        description='Where the next and previous pages are (RFC 8288): '
        '`<https://…?offset=100&limit=50>; rel="next", <…>; rel="prev"`; a link is left '
        "out on the last (first) page.",
    ),
]


def page_url(request, **change) -> str:
    """This request's URL with some query parameters changed."""
    q = request.query_params.dict() if hasattr(request, "query_params") else request.GET.dict()
    q.update({k: str(v) for k, v in change.items()})
    return request.build_absolute_uri(request.path) + "?" + urlencode(q)


def page_links(request, *, offset: int, limit: int, shown: int, total: int) -> dict[str, str]:
    links = {}
    if offset + shown < total:
        links["next"] = page_url(request, offset=offset + shown, limit=limit)
    if offset > 0:
        links["prev"] = page_url(request, offset=max(0, offset - limit), limit=limit)
    return links


def total_of(queryset, *, offset: int, limit: int, shown: int) -> int:
    """How many rows ``queryset`` has, knowing a page of ``shown`` rows was read at
    ``offset``: no COUNT when that page shows the end."""
    if shown < limit and (shown or offset == 0):
        return offset + shown
    return queryset.order_by().count()


def paged(request, queryset, serializer_class, *, offset: int, limit: int,
          transform=None, context=None) -> Response:
    """One page of ``queryset`` as a JSON array, with X-Total-Count and Link headers.
    ``transform`` (rows → rows) may reorder what was read (e.g. oldest first);
    ``context`` (rows → dict) gives the serializer its context."""
    rows = list(queryset[offset: offset + limit])
    total = total_of(queryset, offset=offset, limit=limit, shown=len(rows))
    out = transform(rows) if transform else rows
    extra = {"context": context(rows)} if context else {}
    data = serializer_class(out, many=True, **extra).data
    return with_headers(Response(data), request, offset=offset, limit=limit,
                        shown=len(rows), total=total)


def with_headers(response: Response, request, *, offset: int, limit: int, shown: int,
                 total: int) -> Response:
    response[TOTAL_HEADER] = str(total)
    links = page_links(request, offset=offset, limit=limit, shown=shown, total=total)
    if links:
        response["Link"] = ", ".join(f'<{url}>; rel="{rel}"' for rel, url in links.items())
    return response
