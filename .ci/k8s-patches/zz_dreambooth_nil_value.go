// Added by .ci/k8s-build.sh (dreambooth-operator): Go >= 1.18 broke the "zero value means null" test of the
// type validator. reflect.Zero now points small types at runtime.zeroVal, and so does every empty string
// boxed in an interface (runtime.convTstring), so reflect.DeepEqual(reflect.Zero(t), reflect.ValueOf(""))
// became true and every "" in a custom resource was reported as `Invalid value: "null"`. With the Go 1.15
// this release was built with, that comparison only held for nil pointer-shaped values; keep exactly that.

package validate

import "reflect"

func dreamboothIsNilValue(data interface{}) bool {
	if data == nil {
		return true
	}
	v := reflect.ValueOf(data)
	switch v.Kind() {
	case reflect.Ptr, reflect.Map, reflect.Chan, reflect.Func, reflect.UnsafePointer:
		return v.IsNil()
	}
	return false
}
