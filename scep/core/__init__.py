"""The SCEP core, framework-free: protocol constants, DER and CMS, the certificate profile, the
PKIOperation state machine, the CA lifecycle and its maintenance. Nothing here knows HTTP, Azure or where
keys live."""
