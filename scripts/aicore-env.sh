#!/usr/bin/env bash
# The SAP AI Core variables the deployment guide's calls use (k8s/README.md, step 3), from a service key.
#
#   AICORE=$(scripts/aicore-env.sh aicore-key.json) && eval "$AICORE"
#
# Reads `url`, `clientid`, `clientsecret` and `serviceurls.AI_API_URL` from the service key (a JSON file saved
# from the BTP cockpit), fetches an OAuth token (client credentials; valid about 2 hours) and prints `export`
# lines for AI_API_URL, TOKEN and RG (the resource group: $RG if set, else `default`). Any failure (a missing
# field, an HTTP error, an answer without a token) stops it with a message and a non-zero exit, and prints no
# exports, so the `&&` above never evaluates an empty token.
set -euo pipefail

key=${1:?usage: scripts/aicore-env.sh SERVICE_KEY.json}
field() { jq -er "$1 // empty" "$key" || { echo "aicore-env: $key has no $1" >&2; exit 1; }; }

AUTH_URL=$(field .url)
CLIENT_ID=$(field .clientid)
CLIENT_SECRET=$(field .clientsecret)
AI_API_URL=$(field .serviceurls.AI_API_URL)

answer=$(curl -sS --fail --max-time 30 -X POST "${AUTH_URL%/}/oauth/token" \
  -u "$CLIENT_ID:$CLIENT_SECRET" -d grant_type=client_credentials) \
  || { echo "aicore-env: the token request to ${AUTH_URL%/}/oauth/token failed" >&2; exit 1; }
TOKEN=$(jq -er '.access_token // empty' <<<"$answer") \
  || { echo "aicore-env: the token answer holds no access_token" >&2; exit 1; }

printf 'export AI_API_URL=%q\nexport TOKEN=%q\nexport RG=%q\n' "$AI_API_URL" "$TOKEN" "${RG:-default}"
