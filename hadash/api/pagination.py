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


def paged(request, queryset, serializer_class, *, offset: int, limit: int,
          transform=None) -> Response:
    """One page of ``queryset`` as a JSON array, with X-Total-Count and Link headers.
    ``transform`` (rows → rows) may reorder what was read (e.g. oldest first)."""
    rows = list(queryset[offset: offset + limit])
    if len(rows) < limit and (rows or offset == 0):
        total = offset + len(rows)  # this page shows the end: no COUNT needed
    else:
        total = queryset.order_by().count()
    data = serializer_class(transform(rows) if transform else rows, many=True).data
    return with_headers(Response(data), request, offset=offset, limit=limit,
                        shown=len(rows), total=total)


def with_headers(response: Response, request, *, offset: int, limit: int, shown: int,
                 total: int) -> Response:
    response[TOTAL_HEADER] = str(total)
    links = page_links(request, offset=offset, limit=limit, shown=shown, total=total)
    if links:
        response["Link"] = ", ".join(f'<{url}>; rel="{rel}"' for rel, url in links.items())
    return response
