"""The package version, in a module of its own: every layer records it, and none need import the
package face for it."""

__version__ = "0.1.0"
