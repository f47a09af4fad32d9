"""The HTTP routes of DESIGN.md "HTTP API", one module each."""

from __future__ import annotations

from fastapi import APIRouter

from cotap.server.routes import correspond, embed, health, metrics, models, prototypes, web

ROUTERS: list[APIRouter] = [
    embed.router,
    prototypes.router,
    correspond.router,
    models.router,
    health.router,
    metrics.router,
    web.router,
]
