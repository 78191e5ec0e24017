#!/bin/sh
# The image's entry point: `fhir-kap "$@"`, after reading secrets from files.
# For every variable NAME_FILE in the environment, NAME is set to the content of that file (a
# compose or Kubernetes secret), e.g. FHIR_KAP_DATABASE_URL_FILE=/run/secrets/database_url or
# PRACTICE_A_TOKEN_FILE=/run/secrets/practice_a_token; NAME_FILE itself is then unset. Secrets
# thus live neither in the image nor in the compose file.
set -eu
for name in $(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)_FILE=.*$/\1/p'); do
  eval "file=\${${name}_FILE}"
  if [ ! -r "$file" ]; then
    echo "fhir-kap-entrypoint: ${name}_FILE names a file that cannot be read" >&2
    exit 78
  fi
  value=$(cat "$file")
  export "$name=$value"
  unset "${name}_FILE"
done
exec fhir-kap "$@"
