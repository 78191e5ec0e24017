"""Generated code (profiles/build/gen_validators.py); do not edit."""
