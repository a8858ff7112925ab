"""Staff web inbox routes (placeholder until the UI lands)."""

from fastapi import APIRouter

router = APIRouter()
