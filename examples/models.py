"""The API shapes both example services share: what the owner serves and the consumer caches."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CurrencyIn(BaseModel):
    """The body of ``PUT /currencies/{code}``."""

    name: str = Field(min_length=1, max_length=100)
    rate: float = Field(gt=0)


class Currency(CurrencyIn):
    """A currency as the owner serves it; ``version`` grows by one on every change."""

    model_config = ConfigDict(from_attributes=True)

    code: str
    version: int


class CustomerIn(BaseModel):
    """The body of ``PUT /customers/{customer_id}``."""

    name: str = Field(min_length=1, max_length=200)
    email: str = Field(min_length=3, max_length=200)
    tier: str = "standard"


class Customer(CustomerIn):
    """A customer as the owner serves it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    version: int
