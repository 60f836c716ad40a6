"""What every app uses: errors, the lookup cache, error rendering, the Redis client, OpenAPI helpers.

Imports point here from ``providers``, ``billing`` and ``chat``; ``core`` imports none of them."""
