"""The experiments that reproduce the findings (not installed with tfkl; see README.md here).

It imports the product (tfkl, attacks, tff_programs); the product never imports it."""
