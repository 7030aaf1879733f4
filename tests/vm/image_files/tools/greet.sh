#!/bin/sh
echo "hello from the custom image"
