"""FHIR basics every room uses (layer 0, base): which release a resource is written in
(`release`), business identifiers and references (`identifiers`), the transcript rule
(`textscan`), the one retry rule for HTTP answers (`retry`), FHIR's escaping of search values
(`searchvalues`) and what a number from outside input may be (`digits`).

Imports nothing of ours but the other base modules (`errors`, `config`, `jsonio`).
"""
